"""Prompt sets with a measurable answer: what GradSAE scores latents against and what the masking
and steering experiments decode (methods.md §3.3).

A prompt is token ids (BOS first when the tokenizer has one, like the harvested contexts) and the
answer the model should continue it with. Built in:

* ``storyworld-facts``: held-out storyworld documents cut right before a fact answer
  (``... mia lives in`` → ``quito``), prefixes of realistic length up to the full context. The
  answer word never occurs earlier in the prefix, so the model can only get it from its weights.
  Documents come from the held-out split after the ones evaluation uses.
* ``smollm2-capitals``: capital-city questions in a Q/A frame that SmolLM2-135M-Instruct completes
  (``Q: What is the capital of France?\\nA: The capital of France is`` → ``Paris``).
* a ``.jsonl`` file (local or s3://): one ``{"prompt": ..., "answer": ...}`` per line (optional
  ``"id"``); the answer continues the prompt after one space (none when the prompt ends in
  whitespace).

Every sweep keeps only the prompts the unmodified model answers correctly by greedy decoding
(as the paper filters SQuAD), so the unperturbed reference is 100 % exact match.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

BUILTIN = ("storyworld-facts", "smollm2-capitals")
STEER_SEED = 42   # the released code's seed for choosing the steering partner


@dataclass
class Prompt:
    id: str
    text: str
    ids: list[int]            # what the model reads
    keep: list[bool]          # positions the SAE is spliced at (as harvested: no BOS, no skip_first)
    answer: str
    answer_ids: list[int]     # the answer's tokens as a continuation of the prompt
    partner: str = ""         # steering target: another prompt of the set with a different answer


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt] = field(default_factory=list)

    def by_id(self) -> dict[str, Prompt]:
        return {p.id: p for p in self.prompts}


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Turkey": "Ankara", "India": "New Delhi", "Thailand": "Bangkok", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "South Korea": "Seoul", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Brazil": "Brasilia", "Colombia": "Bogota", "Venezuela": "Caracas", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "Ukraine": "Kyiv", "Czech Republic": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Iceland": "Reykjavik", "New Zealand": "Wellington",
    "Malaysia": "Kuala Lumpur", "Afghanistan": "Kabul", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Qatar": "Doha", "Ghana": "Accra",
    "Senegal": "Dakar", "Tunisia": "Tunis", "Algeria": "Algiers", "Uganda": "Kampala", "Scotland": "Edinburgh",
    "England": "London", "Wales": "Cardiff", "United States": "Washington",
}
CAPITAL_FRAME = "Q: What is the capital of {c}?\nA: The capital of {c} is"


def _encode(tok, corpus_spec, text: str, answer: str) -> tuple[list[int], list[bool], list[int]]:
    from ..harvest.corpus import _pack, _special_ids

    bos, pad, _ = _special_ids(tok)
    body = tok(text, add_special_tokens=False).input_ids
    sep = "" if not text or text[-1].isspace() else " "
    full = tok(text + sep + answer, add_special_tokens=False).input_ids
    ans = full[len(body):] if full[:len(body)] == body else tok(sep + answer, add_special_tokens=False).input_ids
    n = len(body) + (bos is not None)
    c = _pack([body], 0, n, bos, pad, corpus_spec.drop_bos, corpus_spec.skip_first)
    return c.ids[0].tolist(), c.keep[0].tolist(), list(ans)


def storyworld_facts(n: int, corpus_spec, tok, min_len: int = 16) -> list[tuple[str, str, str]]:
    """(id, prefix text, answer) of ``n`` fact-recall prompts from held-out documents."""
    from ..storyworld.generator import generate_doc

    out: list[tuple[str, str, str]] = []
    start = corpus_spec.heldout_docs   # after the documents evaluation reads
    limit = start + max(200, 50 * n)
    i = start
    while len(out) < n and i < limit:
        doc = generate_doc(i, corpus_spec.seed, "heldout")
        words = doc.words[: corpus_spec.context_len - 1]
        cand = [p - 1 for p in np.flatnonzero(doc.labels["is_fact_answer"]) if p - 1 < len(words)]
        cand = [j for j in cand if j >= min_len and words[j] not in words[:j]]
        if cand:
            j = random.Random(f"facts/{i}").choice(cand)
            out.append((f"sw{i:06d}.{j}", " ".join(words[:j]), words[j]))
        i += 1
    if len(out) < n:
        raise InputError(f"prompt set storyworld-facts: only {len(out)} documents in {limit - start} have a fact "
                         f"answer after {min_len} words; lower n_prompts or min_prompt_len")
    return out


def read_jsonl(url: str) -> list[tuple[str, str, str]]:
    from ..harvest.corpus import iter_jsonl

    out, seen = [], set()
    try:
        for n, rec in iter_jsonl(url):
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
                raise InputError(f"prompt set {url}:{n}: needs string fields 'prompt' and 'answer'")
            if not rec["prompt"].strip() or not rec["answer"].strip():
                raise InputError(f"prompt set {url}:{n}: 'prompt' and 'answer' must not be empty")
            pid = str(rec.get("id", f"p{n:06d}"))
            if pid in seen:
                raise InputError(f"prompt set {url}:{n}: id {pid!r} is used twice")
            seen.add(pid)
            out.append((pid, rec["prompt"], rec["answer"]))
    except FileNotFoundError:
        raise InputError(f"prompt set {url}: no such file; give a .jsonl with one "
                         '{"prompt": ..., "answer": ...} per line') from None
    if not out:
        raise InputError(f"prompt set {url}: no prompts in the file")
    return out


def set_name(source: str) -> str:
    """A prompt set's name in paths and tables: the built-in name or the file's stem."""
    if source in BUILTIN:
        return source
    stem = source.rstrip("/").rsplit("/", 1)[-1]
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem.rsplit(".", 1)[0]) or "prompts"


def build(source: str, tok, corpus_spec, n: int, min_len: int = 16) -> PromptSet:
    """The first ``n`` prompts of a set, tokenized for ``tok``, steering partners chosen."""
    if source == "storyworld-facts":
        raw = storyworld_facts(n, corpus_spec, tok, min_len)
    elif source == "smollm2-capitals":
        raw = [(f"cap.{c.replace(' ', '_')}", CAPITAL_FRAME.format(c=c), a) for c, a in CAPITALS.items()][:n]
    elif source.endswith(".jsonl"):
        raw = read_jsonl(source)[:n]
    else:
        raise InputError(f"prompt set {source!r}: use one of {', '.join(BUILTIN)} or a .jsonl file")
    ps = PromptSet(set_name(source))
    for pid, text, answer in raw:
        ids, keep, ans = _encode(tok, corpus_spec, text, answer)
        if not ans:
            raise InputError(f"prompt set {source}, prompt {pid}: the answer {answer!r} tokenizes to nothing")
        ps.prompts.append(Prompt(pid, text, ids, keep, answer, ans))
    rng = random.Random(STEER_SEED)
    from .answers import normalize

    for p in ps.prompts:
        others = [q.id for q in ps.prompts if normalize(q.answer) != normalize(p.answer)]
        p.partner = rng.choice(others) if others else ""
    return ps

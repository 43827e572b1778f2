"""Storyworld documents: a seeded left-to-right probabilistic language with per-token ground truth.

The language is written as one Python generator per document (:func:`_story`) that *yields the
distribution of the next word* and receives the word that was drawn. It branches only on the
words it has emitted and on the document topic, never on hidden randomness, so

* :func:`generate_doc` draws a document by sampling each yielded distribution, and
* :func:`next_token_truth` recovers the exact next-token distribution given the prefix by running
  one copy of the process per topic and weighting them with the topic posterior (Bayes over the
  only latent variable). Its mean ``-log p`` on held-out text is the optimal loss a perfect model
  could reach, so every model's excess loss is known.

Ground-truth labels are recorded per token while the document is generated (category, topic,
quotation, bracket depth, counting position, fact answers, copy targets). Documents, labels and the
true distributions are pure functions of ``(seed, split, index)``: nothing needs storing, a
downstream stage regenerates the labels of document ``i`` from its id. The grammar is described in
``docs/storyworld.md``.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator

import numpy as np

from ..errors import InputError
from .vocab import (BOS, CATEGORIES, FACTS, GUEST_VERBS, LANGUAGE_VERSION, NONCE, TOPIC_PLACES, TOPICS,
                    WORD_CATEGORY, WORD_ID, ZIPF_ALPHA)

SPLITS = ("train", "heldout")
CONTEXT_LEN = 128          # tokens per document including BOS: one document = one context
MAX_SENTENCE = 17          # longest sentence the grammar can produce (a full bracket list)
STOP_LEN = CONTEXT_LEN - 1 - MAX_SENTENCE   # no new sentence starts once a document has this many words
PACK_BUDGET = 14           # tokens from a list's "(" to its final ")"
MAX_DEPTH = 3
MAX_COUNT = 10


# ---- distributions --------------------------------------------------------------------------

class Dist:
    """A finite distribution over words (normalised on construction)."""

    __slots__ = ("words", "probs", "_cum", "_index")

    def __init__(self, words: list[str], probs: list[float]):
        z = float(sum(probs))
        self.words = list(words)
        self.probs = [p / z for p in probs]
        self._cum: list[float] | None = None
        self._index: dict[str, float] | None = None

    def sample(self, u: float) -> str:
        if self._cum is None:
            acc, cum = 0.0, []
            for p in self.probs:
                acc += p
                cum.append(acc)
            self._cum = cum
        i = bisect.bisect_right(self._cum, u * self._cum[-1])
        return self.words[min(i, len(self.words) - 1)]

    def prob(self, word: str) -> float:
        if self._index is None:
            idx: dict[str, float] = {}
            for w, p in zip(self.words, self.probs):
                idx[w] = idx.get(w, 0.0) + p
            self._index = idx
        return self._index.get(word, 0.0)

    def items(self) -> Iterable[tuple[str, float]]:
        return zip(self.words, self.probs)


# Mixtures and uniforms are interned per document: within one document the same distributions are
# asked for again and again (the people mentioned so far change only a few times), and rebuilding
# each one, with its cumulative table on first sample, was a third of the generator's cost. The memo
# is cleared at the start of every document (so memory stays flat however many are generated) and
# whenever it outgrows _MEMO_MAX. Keys hold the component Dist objects themselves (identity-hashed),
# so a key never aliases a freed distribution. An interned Dist is exactly what the uncached code
# builds, word order included: documents are unchanged.
_MEMO: dict[tuple, "Dist"] = {}
_MEMO_MAX = 20_000


def _interned(key: tuple, build) -> "Dist":
    d = _MEMO.get(key)
    if d is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        d = _MEMO[key] = build()
    return d


def _mix(parts: tuple[tuple[float, Dist], ...]) -> Dist:
    acc: dict[str, float] = {}
    for w, d in parts:
        if w <= 0:
            continue
        for word, p in d.items():
            acc[word] = acc.get(word, 0.0) + w * p
    return Dist(list(acc), list(acc.values()))


def mix(parts: list[tuple[float, Dist]]) -> Dist:
    """Weighted mixture of distributions (weights need not be normalised; zero weights drop out)."""
    key = ("mix", *parts)
    return _interned(key, lambda: _mix(key[1:]))


def uniform(words: Iterable[str]) -> Dist:
    ws = tuple(words)
    return _interned(("uniform", *ws), lambda: Dist(list(ws), [1.0] * len(ws)))


def weighted(words: Iterable[str], weights: Iterable[float]) -> Dist:
    """``Dist(words, weights)``, interned like :func:`mix`."""
    ws, xs = tuple(words), tuple(weights)
    return _interned(("weighted", ws, xs), lambda: Dist(list(ws), list(xs)))


_POINT: dict[str, Dist] = {}


def point(word: str) -> Dist:
    d = _POINT.get(word)
    if d is None:
        d = _POINT[word] = Dist([word], [1.0])
    return d


def _zipf(words: tuple[str, ...], alpha: float) -> Dist:
    return Dist(list(words), [1.0 / (r + 1) ** alpha for r in range(len(words))])


CAT_DIST: dict[str, Dist] = {c: _zipf(ws, ZIPF_ALPHA[c]) for c, ws in CATEGORIES.items()}
NAMES = CATEGORIES["name"]
NUMBERS = CATEGORIES["number"]
ALL_NAMES = uniform(NAMES)
# Topic places: 85 % one of the topic's own four places, 15 % any place.
PLACE_DIST = {t: mix([(0.85, _zipf(TOPIC_PLACES[t], 0.5)), (0.15, CAT_DIST["place"])]) for t in TOPICS}
# What goes into a bracket list, by topic: 75 % the topic's own category, 25 % the other three.
_PACK_CATS = ("food", "tool", "instrument", "body")
_TOPIC_PACK = {"farm": "food", "kitchen": "food", "travel": "tool", "workshop": "tool", "music": "instrument",
               "clinic": "body"}
PACK_DIST = {t: mix([(0.75, CAT_DIST[_TOPIC_PACK[t]])] +
                    [(0.25 / 3, CAT_DIST[c]) for c in _PACK_CATS if c != _TOPIC_PACK[t]]) for t in TOPICS}

# ---- sentence kinds and topic weights ---------------------------------------------------------

# Predicates after a person's name: first word -> (kind, base weight). Facts are topic-neutral so
# every fact is stated equally often in every topic.
NAME_PREDICATES: dict[str, tuple[str, float]] = {
    "lives": ("fact:home", 1.0), "works": ("fact:job", 0.6), "is": ("fact:job", 0.5),
    "has": ("fact:pet", 1.0), "travels": ("travel", 0.8), "eats": ("eat", 0.6), "buys": ("buy", 0.6),
    "sees": ("see", 0.8), "says": ("say", 0.9), "counts": ("count", 0.5), "packs": ("pack", 0.5),
    "plays": ("play", 0.5), "hurts": ("hurt", 0.5), "uses": ("use", 0.6), "meets": ("meet", 0.5),
}
# Second word after a sentence-initial "the": word -> (kind, base weight); "<animal>" = describe.
THE_SECOND: dict[str, tuple[str, float]] = {
    "home": ("fact:home", 0.5), "job": ("fact:job", 0.5), "pet": ("fact:pet", 0.5),
    "guest": ("guest", 1.2), "<animal>": ("describe", 0.6),
}
# Topic multipliers on the kinds (1 where not listed): topics change which words are used.
TOPIC_BOOST: dict[str, dict[str, float]] = {
    "farm": {"see": 4, "describe": 4, "eat": 2},
    "kitchen": {"eat": 4, "buy": 4, "use": 2},
    "travel": {"travel": 6, "count": 2, "meet": 3},
    "workshop": {"use": 5, "pack": 3, "hurt": 1.5},
    "music": {"play": 6, "say": 2, "count": 2},
    "clinic": {"hurt": 6, "meet": 2, "say": 1.5},
}
# Sentence-initial word groups.
START_WEIGHT = {"name": 0.62, "the": 0.18, "at": 0.08, "code": 0.22, "a": 0.10}
# Kinds allowed inside a quotation (no nested quotes, lists, counting, codes or guests).
INNER_KINDS = {"fact:home", "fact:job", "fact:pet", "travel", "eat", "buy", "see", "play", "hurt", "use",
               "meet", "describe"}
MAX_PER_DOC = {"say": 2, "count": 1, "pack": 1, "code_recall": 4, "guest": 3}
FACT_TEMPLATES = {  # documented in docs/storyworld.md; used by tests to recognise every statement
    "home": ("{p} lives in {a}", "the home of {p} is {a}"),
    "job": ("{p} works as a {a}", "{p} is a {a}", "the job of {p} is {a}"),
    "pet": ("{p} has a pet {a}", "the pet of {p} is a {a}"),
}


# ---- the document process -------------------------------------------------------------------

@dataclass
class _Ctx:
    """State the process exposes for labelling the token it is about to emit."""

    pos: int = 1                  # position of the next token (BOS is position 0)
    in_quote: bool = False
    depth: int = 0                # brackets open before the next token
    count: int = 0
    fact: tuple[str, str] | None = None       # (relation, person) when the next token is a fact answer
    copy: tuple[str, int] | None = None       # (kind, source position) when it repeats an earlier token


Proc = Generator[Dist, str, None]


def _story(ctx: _Ctx, topic: str) -> Proc:
    boost = TOPIC_BOOST[topic]
    mentioned: list[str] = []                 # people in order of first mention
    stated: set[tuple[str, str]] = set()      # (relation, person) already stated in this document
    used: dict[str, int] = {}                 # per-document counts of limited kinds
    code: list[tuple[str, int]] = []          # the document's secret code: (word, position)
    guest: list[tuple[str, int]] = []         # the guest's nonce name: [(word, position)]
    n_words = 0

    def emit(d: Dist) -> Generator[Dist, str, str]:
        nonlocal n_words
        w = yield d
        n_words += 1
        ctx.pos += 1
        ctx.fact = ctx.copy = None
        return w

    def weight(kind: str, base: float) -> float:
        return base * boost.get(kind, 1.0)

    def avail_people(rel: str) -> list[str]:
        return [p for p in NAMES if (rel, p) not in stated]

    def person_dist(candidates: list[str] | tuple[str, ...]) -> Dist:
        # Half the time someone already in the story, half the time anyone: names recur in context.
        seen = [p for p in mentioned if p in candidates]
        if not seen:
            return uniform(candidates)
        return mix([(0.5, uniform(seen)), (0.5, uniform(candidates))])

    def person(candidates: list[str] | tuple[str, ...] = NAMES) -> Generator[Dist, str, str]:
        p = yield from emit(person_dist(candidates))
        if p not in mentioned:
            mentioned.append(p)
        return p

    def fact(rel: str, who: str) -> Generator[Dist, str, str]:
        ctx.fact = (rel, who)
        stated.add((rel, who))
        return (yield from emit(point(FACTS[rel][who])))

    def lits(*words: str) -> Generator[Dist, str, None]:
        for w in words:
            yield from emit(point(w))

    def kind_ok(kind: str, inner: bool) -> bool:
        if inner and kind not in INNER_KINDS:
            return False
        if kind in MAX_PER_DOC and used.get(kind, 0) >= MAX_PER_DOC[kind]:
            return False
        return True

    def name_sentence(subj: str, inner: bool) -> Generator[Dist, str, None]:
        opts = []
        for word, (kind, base) in NAME_PREDICATES.items():
            if kind.startswith("fact:") and (kind[5:], subj) in stated:
                continue
            if kind_ok(kind, inner):
                opts.append((word, weight(kind, base)))
        verb = yield from emit(weighted([w for w, _ in opts], [x for _, x in opts]))
        kind = NAME_PREDICATES[verb][0]
        used[kind] = used.get(kind, 0) + 1
        if verb == "lives":
            yield from lits("in")
            yield from fact("home", subj)
        elif verb == "works":
            yield from lits("as", "a")
            yield from fact("job", subj)
        elif verb == "is":
            yield from lits("a")
            yield from fact("job", subj)
        elif verb == "has":
            yield from lits("a", "pet")
            yield from fact("pet", subj)
        elif verb == "travels":
            yield from lits("to")
            yield from emit(CAT_DIST["city"])
        elif verb == "eats":
            yield from emit(CAT_DIST["food"])
        elif verb == "buys":
            yield from emit(CAT_DIST["number"])
            yield from emit(CAT_DIST["food"])
        elif verb == "sees":
            yield from lits("a")
            yield from emit(CAT_DIST["colour"])
            yield from emit(CAT_DIST["animal"])
        elif verb == "plays":
            yield from lits("the")
            yield from emit(CAT_DIST["instrument"])
        elif verb == "hurts":
            yield from lits("the")
            yield from emit(CAT_DIST["body"])
        elif verb == "uses":
            yield from lits("a")
            yield from emit(CAT_DIST["colour"])
            yield from emit(CAT_DIST["tool"])
        elif verb == "meets":
            yield from person(tuple(p for p in NAMES if p != subj))
        elif verb == "says":
            yield from lits('"')
            ctx.in_quote = True
            yield from sentence(inner=True)
            ctx.in_quote = False
            yield from lits('"')
        elif verb == "counts":
            for c in range(1, MAX_COUNT + 1):
                ctx.count = c
                if c == 1:
                    yield from emit(point(NUMBERS[0]))
                    continue
                # Keep counting (the successor is certain) or stop.
                w = yield from emit(weighted((NUMBERS[c - 1], "."), (0.7, 0.3)))
                if w == ".":
                    ctx.count = 0
                    return
            ctx.count = 0
        elif verb == "packs":
            yield from bracket_list()
        if verb != "counts" or ctx.count == 0:
            if not inner:
                yield from lits(".")

    def bracket_list() -> Generator[Dist, str, None]:
        # A nested list of items: "( bread egg ( rope saw ) cake )". ctx.depth = brackets open.
        yield from lits("(")
        depth, spent, n_in = 1, 1, [0]
        ctx.depth = 1
        while depth > 0:
            opts: list[tuple[float, Dist]] = []
            if spent + 1 + depth <= PACK_BUDGET:               # an item, then every bracket closed
                opts.append((0.55, PACK_DIST[topic]))
            if depth < MAX_DEPTH and spent + 2 + depth + 1 <= PACK_BUDGET:   # "(", an item, all closed
                opts.append((0.2, point("(")))
            if n_in[-1] >= 1:                                  # no empty lists
                opts.append((0.25, point(")")))
            w = yield from emit(mix(opts))
            spent += 1
            if w == "(":
                n_in[-1] += 1
                n_in.append(0)
                depth += 1
            elif w == ")":
                n_in.pop()
                depth -= 1
            else:
                n_in[-1] += 1
            ctx.depth = depth

    def code_sentence() -> Generator[Dist, str, None]:
        if code:  # recall: the same code again, token for token
            used["code_recall"] = used.get("code_recall", 0) + 1
            for w, src in code:
                ctx.copy = ("code", src)
                yield from emit(point(w))
            yield from lits(".")
            return
        banned = {g for g, _ in guest}
        for i in range(5):
            pool = [z for z in NONCE if z not in banned]
            d = uniform(pool) if i < 3 else mix([(0.5, uniform(pool)), (0.5, point("."))])
            pos = ctx.pos
            w = yield from emit(d)
            if w == ".":
                return
            code.append((w, pos))
            banned.add(w)
        yield from lits(".")

    def the_sentence(inner: bool) -> Generator[Dist, str, None]:
        opts: list[tuple[float, Dist]] = []
        for word, (kind, base) in THE_SECOND.items():
            if kind.startswith("fact:") and not avail_people(kind[5:]):
                continue
            if kind == "guest" and not guest:
                continue
            if not kind_ok(kind, inner):
                continue
            d = CAT_DIST["animal"] if word == "<animal>" else point(word)
            opts.append((weight(kind, base), d))
        second = yield from emit(mix(opts))
        if second in ("home", "job", "pet"):
            yield from lits("of")
            who = yield from person(avail_people(second))
            yield from lits("is")
            if second == "pet":
                yield from lits("a")
            yield from fact(second, who)
        elif second == "guest":
            used["guest"] = used.get("guest", 0) + 1
            g, src = guest[0]
            ctx.copy = ("guest", src)
            yield from emit(point(g))
            yield from emit(uniform(GUEST_VERBS))
        else:  # describe: "the cow is brown"
            yield from lits("is")
            yield from emit(CAT_DIST["colour"])
        if not inner:
            yield from lits(".")

    def sentence(inner: bool = False) -> Generator[Dist, str, None]:
        groups: list[tuple[float, Dist]] = [(START_WEIGHT["name"], person_dist(NAMES)),
                                            (START_WEIGHT["the"], point("the")),
                                            (START_WEIGHT["at"], point("at"))]
        if n_words == 0:  # stories usually open by setting the scene
            groups = [(0.3 * w, d) for w, d in groups[:2]] + [(0.7, point("at"))]
        if not inner:
            if not code or used.get("code_recall", 0) < MAX_PER_DOC["code_recall"]:
                groups.append((START_WEIGHT["code"], point("code")))
            if not guest:
                groups.append((START_WEIGHT["a"], point("a")))
        first = yield from emit(mix(groups))
        if first == "the":
            yield from the_sentence(inner)
        elif first == "at":
            yield from lits("the")
            yield from emit(PLACE_DIST[topic])
            if not inner:
                yield from lits(".")
        elif first == "code":
            yield from code_sentence()
        elif first == "a":
            yield from lits("guest", "named")
            pos = ctx.pos
            g = yield from emit(uniform([z for z in NONCE if z not in {w for w, _ in code}]))
            guest.append((g, pos))
            yield from lits("arrives", ".")
        else:
            if first not in mentioned:
                mentioned.append(first)
            yield from name_sentence(first, inner)

    while n_words < STOP_LEN:
        yield from sentence()


# ---- documents ------------------------------------------------------------------------------

LABEL_FIELDS = ("category", "in_quote", "depth", "count", "is_fact_answer", "fact_relation", "fact_entity",
                "is_copy_target", "copy_kind", "copy_src")


@dataclass
class Doc:
    """One document. ``tokens`` = ``[BOS] + words`` is what a model sees (the tokenizer adds BOS to
    ``text``); every array in ``labels`` has one entry per token, position 0 being BOS."""

    index: int
    seed: int
    split: str
    topic: str
    words: list[str]
    labels: dict[str, np.ndarray] = field(repr=False)

    @property
    def tokens(self) -> list[str]:
        return [BOS] + self.words

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def token_ids(self) -> list[int]:
        return [WORD_ID[w] for w in self.tokens]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown storyworld split '{split}'; use one of: {', '.join(SPLITS)}")


def _rng(index: int, seed: int, split: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and platforms, and
    # the split is part of the seed, so train and held-out documents share no random stream.
    return random.Random(f"{LANGUAGE_VERSION}/{seed}/{split}/{index}")


def _draw(index: int, seed: int, split: str, on_word=None) -> tuple[str, list[str]]:
    """(topic, words) of a document; ``on_word(word, ctx)`` sees each word with the process state
    it was drawn in (before the process advances)."""
    _check_split(split)
    if index < 0:
        raise InputError(f"storyworld document index must be >= 0, got {index}")
    rng = _rng(index, seed, split)
    topic = TOPICS[rng.randrange(len(TOPICS))]
    _MEMO.clear()  # see _MEMO
    ctx = _Ctx()
    words: list[str] = []
    proc = _story(ctx, topic)
    d = next(proc)
    while True:
        w = d.sample(rng.random())
        words.append(w)
        if on_word is not None:
            on_word(w, ctx)
        try:
            d = proc.send(w)
        except StopIteration:
            break
    return topic, words


def generate_words(index: int, seed: int = 0, split: str = "train") -> list[str]:
    """The words of :func:`generate_doc` without its labels (a quarter cheaper: what a harvest needs)."""
    return _draw(index, seed, split)[1]


def generate_doc(index: int, seed: int = 0, split: str = "train") -> Doc:
    """Document ``index`` of corpus ``seed``, split ``split`` ("train" or "heldout"): a pure function."""
    cols: dict[str, list] = {k: [] for k in LABEL_FIELDS}
    # BOS row: outside every label.
    for k, v in zip(LABEL_FIELDS, ("", False, 0, 0, False, "", "", False, "", -1)):
        cols[k].append(v)

    def record(w: str, ctx: _Ctx) -> None:
        cols["category"].append(WORD_CATEGORY.get(w, ""))
        cols["in_quote"].append(ctx.in_quote)
        cols["depth"].append(ctx.depth + (w == "("))  # a bracket carries the level of its pair
        cols["count"].append(ctx.count if w in NUMBERS else 0)
        f, c = ctx.fact, ctx.copy
        cols["is_fact_answer"].append(f is not None)
        cols["fact_relation"].append(f[0] if f else "")
        cols["fact_entity"].append(f[1] if f else "")
        cols["is_copy_target"].append(c is not None)
        cols["copy_kind"].append(c[0] if c else "")
        cols["copy_src"].append(c[1] if c else -1)

    topic, words = _draw(index, seed, split, record)
    labels = {
        "category": np.array(cols["category"], dtype=object),
        "in_quote": np.array(cols["in_quote"], dtype=bool),
        "depth": np.array(cols["depth"], dtype=np.int8),
        "count": np.array(cols["count"], dtype=np.int8),
        "is_fact_answer": np.array(cols["is_fact_answer"], dtype=bool),
        "fact_relation": np.array(cols["fact_relation"], dtype=object),
        "fact_entity": np.array(cols["fact_entity"], dtype=object),
        "is_copy_target": np.array(cols["is_copy_target"], dtype=bool),
        "copy_kind": np.array(cols["copy_kind"], dtype=object),
        "copy_src": np.array(cols["copy_src"], dtype=np.int32),
    }
    return Doc(index=index, seed=seed, split=split, topic=topic, words=words, labels=labels)


def iter_docs(n: int, seed: int = 0, split: str = "train", start: int = 0) -> Iterator[Doc]:
    """Documents ``start .. start + n - 1`` of a split."""
    for i in range(start, start + n):
        yield generate_doc(i, seed, split)


# ---- the true next-token distribution -------------------------------------------------------

@dataclass
class Truth:
    """Exact next-token statistics at every position of a document (length = len(doc.tokens)).

    ``p_next[i]`` is the true probability of ``tokens[i + 1]`` given ``tokens[: i + 1]``,
    ``entropy[i]`` the entropy (nats) of that distribution, ``determined[i]`` whether it is a point
    mass, ``topic_posterior[i]`` the posterior of the document's topic after ``tokens[: i + 1]``.
    The last position has no next token (NaN, NaN, False).
    """

    p_next: np.ndarray
    entropy: np.ndarray
    determined: np.ndarray
    topic_posterior: np.ndarray
    argmax: list[str]


def next_token_truth(doc: Doc) -> Truth:
    """Run the document process once per topic on the document's words and mix by topic posterior."""
    n = len(doc.tokens)
    _MEMO.clear()  # see _MEMO
    ctxs = [_Ctx() for _ in TOPICS]
    procs: list[Proc | None] = [_story(c, t) for c, t in zip(ctxs, TOPICS)]
    dists: list[Dist | None] = [next(p) for p in procs]  # type: ignore[arg-type]
    post = np.full(len(TOPICS), 1.0 / len(TOPICS))
    true_t = TOPICS.index(doc.topic)
    p_next = np.full(n, np.nan)
    entropy = np.full(n, np.nan)
    determined = np.zeros(n, dtype=bool)
    topic_post = np.zeros(n)
    argmax: list[str] = []
    topic_post[0] = post[true_t]
    for i, w in enumerate(doc.words):
        acc: dict[str, float] = {}
        for t, d in enumerate(dists):
            if d is None or post[t] == 0:
                continue
            for word, p in d.items():
                acc[word] = acc.get(word, 0.0) + post[t] * p
        ps = np.fromiter(acc.values(), dtype=np.float64)
        ps = ps / ps.sum()
        p_next[i] = acc.get(w, 0.0) / sum(acc.values())
        entropy[i] = float(-(ps * np.log(ps, where=ps > 0, out=np.zeros_like(ps))).sum())
        determined[i] = len(ps) == 1 or bool(ps.max() >= 1.0 - 1e-12)
        argmax.append(max(acc, key=acc.__getitem__))
        like = np.array([d.prob(w) if d is not None else 0.0 for d in dists])
        post = post * like
        z = post.sum()
        if z <= 0:
            raise AssertionError(f"storyworld doc {doc.split}/{doc.index}: word {i} '{w}' is impossible under "
                                 "every topic; the document does not come from this language version")
        post /= z
        topic_post[i + 1] = post[true_t]
        for t, p in enumerate(procs):
            if p is None:
                continue
            if post[t] == 0:
                procs[t] = dists[t] = None
                continue
            try:
                dists[t] = p.send(w)
            except StopIteration:
                procs[t] = dists[t] = None
    argmax.append("")
    return Truth(p_next=p_next, entropy=entropy, determined=determined, topic_posterior=topic_post, argmax=argmax)


def optimal_loss(docs: Iterable[Doc]) -> float:
    """Mean -log p_true(next token) over every predicted position: the loss of a perfect model."""
    tot, n = 0.0, 0
    for d in docs:
        tr = next_token_truth(d)
        lp = -np.log(tr.p_next[:-1])
        tot += float(lp.sum())
        n += len(lp)
    return tot / max(n, 1)


# ---- labels as Arrow -------------------------------------------------------------------------

def labels_table(docs: Iterable[Doc], truth: bool = False) -> "pa.Table":
    """Per-token ground truth as an Arrow table, one row per token of ``[BOS] + words``.

    The join key with harvested activations is ``(doc, pos)``: ``doc`` is the document index
    within its split and ``pos`` the index into ``Doc.tokens`` (pos 0 = BOS, pos i = words[i - 1]),
    which is the sequence position the model sees. Labels describe the token *at* ``pos``;
    ``is_fact_answer`` / ``is_copy_target`` mark the answer token itself, so the model predicts it
    from the residual stream at ``pos - 1`` (``next_*`` columns give the same view shifted).

    With ``truth=True`` the exact next-token statistics are added (:func:`next_token_truth`, about
    5 ms a document): ``next_p_true`` (true probability of the token at ``pos + 1``),
    ``next_entropy`` (nats), ``next_determined`` and ``next_argmax``; null on each document's last row.
    """
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in ("split", "doc", "pos", "token", "token_id", "topic", *LABEL_FIELDS,
                                              "next_token", "next_is_fact_answer", "next_is_copy_target")}
    tcols: dict[str, list] = {k: [] for k in ("next_p_true", "next_entropy", "next_determined", "next_argmax")}
    for d in docs:
        n = len(d.tokens)
        cols["split"].extend([d.split] * n)
        cols["doc"].extend([d.index] * n)
        cols["pos"].extend(range(n))
        cols["token"].extend(d.tokens)
        cols["token_id"].extend(d.token_ids)
        cols["topic"].extend([d.topic] * n)
        for k in LABEL_FIELDS:
            cols[k].extend(d.labels[k].tolist())
        cols["next_token"].extend(d.words + [None])
        cols["next_is_fact_answer"].extend(d.labels["is_fact_answer"][1:].tolist() + [False])
        cols["next_is_copy_target"].extend(d.labels["is_copy_target"][1:].tolist() + [False])
        if truth:
            tr = next_token_truth(d)
            last = [None]
            tcols["next_p_true"].extend(tr.p_next[:-1].tolist() + last)
            tcols["next_entropy"].extend(tr.entropy[:-1].tolist() + last)
            tcols["next_determined"].extend(tr.determined[:-1].tolist() + last)
            tcols["next_argmax"].extend(tr.argmax[:-1] + last)
    types = {"doc": pa.int64(), "pos": pa.int32(), "token_id": pa.int32(), "depth": pa.int8(), "count": pa.int8(),
             "copy_src": pa.int32(), "next_p_true": pa.float64(), "next_entropy": pa.float64()}
    arrays = {k: pa.array(v, type=types.get(k)) for k, v in cols.items()}
    if truth:
        arrays.update({k: pa.array(v, type=types.get(k)) for k, v in tcols.items()})
    return pa.table(arrays)


def entropy_bits(p: float) -> float:  # pragma: no cover - convenience for docs
    return -math.log2(p) if p > 0 else float("inf")

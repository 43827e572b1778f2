"""The offline explainer for storyworld (issue 15): explains a head from the planted structure of
the language and classifies by the rule it wrote, through the same ``generate(messages) -> text``
protocol as an LLM, so the look-up pipeline runs with no model server and its score means something.

It reads only what an LLM would read: the explainer prompt (the predicted token, the active and the
inactive examples as text) or the classifier prompt (the explanation and one example). From each
example's words it computes the storyworld labels a reader can see in the text (docs/storyworld.md):

* ``copy``: the predicted word already occurs earlier in the example (copy context: codes, guests);
* ``quote``: the prediction is inside a quotation (an odd number of ``"`` before it);
* ``bracket``: inside a bracket list (more ``(`` than ``)`` before it), ``depth2``: two deep;
* ``topic=T``: a place word of topic T occurs (the document's topic);
* ``prev=W``: the word right before the prediction is W;
* ``sentence=W``: the sentence being written started with W (its kind: code, a guest, a name, ...);
* ``has=W``: the word W occurs anywhere before the prediction;
* ``short``: at most N words of context (trimming keeps more context when more is needed).

The explainer picks the rule, or its negation, that best separates the active from the inactive
examples (balanced accuracy; ties go to the simpler family, in the order above) and writes it as
a sentence ending in a machine-readable tag ``(rule: prev=of)``. The classifier parses that tag and
applies the rule to the example; an explanation without a tag (an LLM's) gets the answer
"unknown", which the score counts as wrong.
"""
from __future__ import annotations

import re

from ..storyworld.vocab import TOPIC_PLACES

_TOKEN = re.compile(r'predict the next token "(.*?)"', re.S)
_EXAMPLES = re.compile(r'^- """(.*?)"""$', re.M | re.S)
_TAG = re.compile(r"\(rule: (not )?([a-z0-9_]+)(?:=(\S+?))?\)")
_EXAMPLE = re.compile(r'"""(.*)"""', re.S)


def _words(example: str) -> list[str]:
    return example.split()


def _sentence_start(ctx: list[str]) -> str:
    for i in range(len(ctx) - 1, -1, -1):
        if ctx[i] == ".":
            return ctx[i + 1] if i + 1 < len(ctx) else "."
    return ctx[0] if ctx else ""


def features(example: str) -> dict[str, bool | str | int]:
    """The visible labels of one example (its last word is the predicted token)."""
    w = _words(example)
    tok, ctx = (w[-1], w[:-1]) if w else ("", [])
    return {"copy": tok in ctx, "quote": ctx.count('"') % 2 == 1, "bracket": ctx.count("(") > ctx.count(")"),
            "depth2": ctx.count("(") - ctx.count(")") >= 2,
            "topic": [t for t, places in TOPIC_PLACES.items() if any(p in ctx for p in places)],
            "prev": ctx[-1] if ctx else "", "sentence": _sentence_start(ctx), "has": set(ctx), "len": len(ctx)}


def holds(rule: tuple[str, str | None], f: dict) -> bool:
    kind, arg = rule
    if kind in ("copy", "quote", "bracket", "depth2"):
        return bool(f[kind])
    if kind == "topic":
        return arg in f["topic"]
    if kind in ("prev", "sentence"):
        return f[kind] == arg
    if kind == "has":
        return arg in f["has"]
    if kind == "short":
        return f["len"] <= int(arg)
    raise ValueError(f"unknown rule {kind!r}")


def _candidates(fs: list[dict]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [("copy", None), ("quote", None), ("bracket", None), ("depth2", None)]
    out += [("topic", t) for t in sorted({t for f in fs for t in f["topic"]})]
    out += [("prev", p) for p in sorted({f["prev"] for f in fs})]
    out += [("sentence", s) for s in sorted({f["sentence"] for f in fs})]
    out += [("has", h) for h in sorted({h for f in fs for h in f["has"]})]
    out += [("short", str(n)) for n in sorted({f["len"] for f in fs})]
    return out


def _balanced(pred: list[bool], truth: list[bool]) -> float:
    pos = [p for p, t in zip(pred, truth) if t]
    neg = [p for p, t in zip(pred, truth) if not t]
    tpr = sum(pos) / len(pos) if pos else 0.0
    tnr = sum(not p for p in neg) / len(neg) if neg else 0.0
    return (tpr + tnr) / 2


_PHRASE = {
    "copy": "the predicted word already appeared earlier in the document, so the head can copy it",
    "quote": "the predicted word is inside a quotation",
    "bracket": "the predicted word is inside a bracketed list",
    "depth2": "the predicted word is inside a list nested two brackets deep",
    "topic": "the document is about {arg} (one of its places is mentioned)",
    "prev": 'the word right before the predicted one is "{arg}"',
    "sentence": 'the sentence being written starts with "{arg}"',
    "has": 'the word "{arg}" occurs earlier in the document',
    "short": "the document is short (at most {arg} words before the predicted one)",
}


def explain(token: str, active: list[str], inactive: list[str]) -> str:
    fs = [features(e) for e in active + inactive]
    truth = [True] * len(active) + [False] * len(inactive)
    best, best_score = (("copy", None), False), -1.0
    for rule in _candidates(fs):
        hits = [holds(rule, f) for f in fs]
        for negate in (False, True):
            s = _balanced([h != negate for h in hits], truth)
            if s > best_score + 1e-12:
                best, best_score = (rule, negate), s
    (kind, arg), negate = best
    phrase = _PHRASE[kind].format(arg=arg)
    head = f'This head helps predict "{token}" ' + ("unless " if negate else "when ")
    tag = f"(rule: {'not ' if negate else ''}{kind}{'=' + arg if arg is not None else ''})"
    return f"{head}{phrase}. {tag}"


def classify(explanation: str, example: str) -> str:
    m = _TAG.search(explanation)
    if m is None:
        return "unknown"
    negate, kind, arg = bool(m.group(1)), m.group(2), m.group(3)
    try:
        yes = holds((kind, arg), features(example)) != negate
    except (ValueError, KeyError):
        return "unknown"
    return "Yes" if yes else "No"


class RuleExplainer:
    """The :class:`saeray.interp.explain.Explainer` protocol, answered by rule: an explainer prompt
    gets an explanation, a classifier prompt gets Yes or No."""

    def generate(self, messages, max_tokens: int = 0) -> str:
        text = messages[-1]["content"] if not isinstance(messages, str) else messages
        if "Is the given example an active example?" in text:
            explanation, _, rest = text.partition("\nIs the given example an active example?")
            m = _EXAMPLE.search(rest)
            return classify(explanation, m.group(1) if m else "")
        m = _TOKEN.search(text)
        act_part, _, inact_part = text.partition("Inactive examples:")
        return explain(m.group(1) if m else "", _EXAMPLES.findall(act_part), _EXAMPLES.findall(inact_part))

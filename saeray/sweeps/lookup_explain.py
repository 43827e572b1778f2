"""Explaining and scoring the (neuron, head) pairs of one look-up item (methods.md §5.5-5.6): a
plain function over the item's tables and an explainer (:class:`saeray.interp.explain.Explainer`),
and the Ray task around it. The explaining step runs on CPU tasks, not on the model pool: it waits
on an LLM, not on the audited model.

Per pair: the explainer gets the neuron's explanation prompts split by whether the head is active
on them (each with the token appended) and writes when the head is active; the classifier gets
only that explanation and one held-out prompt at a time and answers yes or no; the score is the
balanced accuracy against the head's real activity on the held-out prompts. Pairs whose held-out
prompts are all active or all inactive are skipped (the paper's rule: balanced accuracy needs both),
and say so in ``skipped``. Answers that are neither yes nor no are kept and counted as wrong.
"""
from __future__ import annotations

import math

from ..interp.explain import CLASSIFY_TOKENS, EXPLAIN_TOKENS, classify_messages, explain_messages, parse_yes_no
from .stats import balanced_accuracy


def make_explainer(opt, endpoint: tuple[str, str] | None = None):
    """The explainer a look-up sweep asks for (``explainer``: offline or llm); ``endpoint``
    (base_url, model) of a server the step started (``llm.serve``)."""
    if opt.explainer == "offline":
        from ..interp.rules import RuleExplainer

        return RuleExplainer(), "offline-rules"
    from ..interp.client import LLMClient
    from ..interp.explain import LLMExplainer

    cfg = opt.llm.config(*(endpoint or (None, None)))
    return LLMExplainer(LLMClient(cfg)), f"llm:{opt.llm.serve or cfg.model}"


def explain_item(activating: list[dict], pairs: list[dict], explainer, name: str,
                 max_concurrency: int = 1) -> tuple[list[dict], list[dict]]:
    """(explanation rows, classification rows) for every pair of one item."""
    by_neuron: dict[tuple, list[dict]] = {}
    for p in activating:
        by_neuron.setdefault((p["set"], p["layer"], p["neuron"]), []).append(p)
    rows, cls = [], []
    for pr in pairs:
        key = (pr["set"], pr["layer"], pr["neuron"])
        ps = sorted(by_neuron.get(key, []), key=lambda p: (p["split"], p["rank"]))
        n_heads = _n_heads(ps, pr)
        flat = pr["head_layer"] * n_heads + pr["head"]
        on = [p for p in ps if p["split"] == "explain" and flat in p["active_heads"]]
        off = [p for p in ps if p["split"] == "explain" and flat not in p["active_heads"]]
        test = [p for p in ps if p["split"] == "test"]
        truth = [flat in p["active_heads"] for p in test]
        base = {"target": pr["target"], "set": pr["set"], "layer": pr["layer"], "neuron": pr["neuron"],
                "head_layer": pr["head_layer"], "head": pr["head"]}
        row = {**base, "token": pr["token"], "explainer": name, "explanation": "", "n_active": len(on),
               "n_inactive": len(off), "n_test": len(test), "n_test_active": sum(truth), "score": math.nan,
               "tp": 0, "fn": 0, "tn": 0, "fp": 0, "unparsed": 0, "skipped": ""}
        if not test or all(truth) or not any(truth):
            row["skipped"] = "held-out prompts all active" if test and all(truth) else (
                "held-out prompts all inactive" if test else "no held-out prompts")
            rows.append(row)
            continue
        row["explanation"] = explainer.generate(explain_messages(pr["token"], [p["text"] for p in on],
                                                                 [p["text"] for p in off]), EXPLAIN_TOKENS).strip()
        answers = _classify(explainer, row["explanation"], [p["text"] for p in test], max_concurrency)
        parsed = [parse_yes_no(a) for a in answers]
        b = balanced_accuracy(truth, parsed)
        row.update(score=b.score, tp=b.tp, fn=b.fn, tn=b.tn, fp=b.fp, unparsed=b.unparsed)
        rows.append(row)
        for p, t, a, y in zip(test, truth, answers, parsed):
            cls.append({**base, "rank": p["rank"], "truth": t, "answer": a, "prediction": y,
                        "tokens": p["tokens"][1:] if len(p["tokens"]) > 1 else p["tokens"],
                        "activations": [0.0] * (len(p["tokens"]) - 2) + [p["trimmed_activation"]]})
    return rows, cls


def _n_heads(ps: list[dict], pr: dict) -> int:
    return len(ps[0]["head_scores"]) // pr["layer"] if ps else 1


def _classify(explainer, explanation: str, examples: list[str], max_concurrency: int) -> list[str]:
    msgs = [classify_messages(explanation, e) for e in examples]
    client = getattr(explainer, "client", None)
    if client is not None and max_concurrency > 1:     # an LLM: the client runs them side by side, bounded
        return client.chat_many(msgs, max_tokens=CLASSIFY_TOKENS)
    return [explainer.generate(m, CLASSIFY_TOKENS) for m in msgs]


def explain_task(activating: list[dict], pairs: list[dict], opt, endpoint=None) -> tuple[list[dict], list[dict]]:
    """The Ray task body: builds the explainer in the task (a client holds connections: not shipped)."""
    explainer, name = make_explainer(opt, endpoint)
    try:
        return explain_item(activating, pairs, explainer, name, opt.llm.max_concurrency if opt.llm else 1)
    finally:
        client = getattr(explainer, "client", None)
        if client is not None:
            client.close()

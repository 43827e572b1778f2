"""Explanations of latents from storyworld's planted labels: each latent is explained by the label
whose tokens best match the tokens it fires on (F1 over the dashboard tokens), with the precision
(of its firings, the share on that label) and the recall (of the label's tokens, the share it fires
on) that say how far the explanation holds; when less than half of its firings are on that label,
the page says no label explains it. The language's labels are the ground truth a text
explainer can at best recover, so this is the reference an LLM explainer would be scored against;
no LLM is asked here.

The labels are the evaluate stage's concepts (:func:`saeray.evaluate.concepts.concept_matrix`),
computed for the harvested training documents the dashboards read."""
from __future__ import annotations

import numpy as np

MIN_PRECISION = 0.5   # a label explains a latent when most of its firings are on it


def planted_labels(doc: np.ndarray, pos: np.ndarray, seed: int) -> tuple[list[str], np.ndarray]:
    """(concept names, bool [rows, concepts]) for harvested storyworld rows (doc, pos)."""
    from ..evaluate.concepts import concept_matrix
    from ..storyworld.generator import generate_doc, labels_table

    docs = np.unique(doc)
    tab = labels_table(generate_doc(int(d), seed=seed, split="train") for d in docs).to_pydict()
    tdoc, tpos = np.asarray(tab["doc"], dtype=np.int64), np.asarray(tab["pos"], dtype=np.int64)
    span = int(max(tpos.max(), pos.max())) + 1
    order = np.argsort(tdoc * span + tpos)
    keys = (tdoc * span + tpos)[order]
    want = doc.astype(np.int64) * span + pos
    at = np.searchsorted(keys, want)
    if (at >= len(keys)).any() or (keys[np.minimum(at, len(keys) - 1)] != want).any():
        raise ValueError("harvested rows without storyworld labels (is the corpus storyworld?)")
    return concept_matrix(tab, order[at], min_positives=1)


def explain(fired_rows: np.ndarray, names: list[str], Y: np.ndarray) -> dict:
    """The label that best explains a latent firing on ``fired_rows`` (row indices into ``Y``)."""
    n = len(fired_rows)
    if n == 0:
        return {"explanation": "never fired on the dashboard tokens", "explainer": "planted labels"}
    hits = Y[fired_rows].sum(0).astype(np.float64)
    pos = Y.sum(0).astype(np.float64)
    f1 = 2 * hits / (n + pos)
    j = int(np.argmax(f1))
    prec, rec = hits[j] / n, hits[j] / max(pos[j], 1)
    if prec < MIN_PRECISION:
        text = f"no planted label holds most of its firings (closest: {names[j]}, precision {prec:.2f}, F1 {f1[j]:.2f})"
    else:
        text = f"fires on tokens labelled {names[j]} (precision {prec:.2f}, recall {rec:.2f}, F1 {f1[j]:.2f})"
    return {"explanation": text, "explainer": "planted labels",
            "label": {"concept": names[j], "f1": round(float(f1[j]), 4), "precision": round(float(prec), 4),
                      "recall": round(float(rec), 4)}}

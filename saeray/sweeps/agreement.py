"""How well a score ranks latents the way exact ablation does, per prompt, over the active
latents: Spearman (average ranks for ties) and Pearson correlation, and the overlap of the two
top-k sets (|top-k(score) ∩ top-k(effect)| / k, with k capped at the number of active latents);
and the median / mean over prompts that skip prompts without a figure."""
from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    # average the ranks of ties
    xs = x[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            r[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else math.nan


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64)))


def topk_overlap(score: np.ndarray, effect: np.ndarray, k: int) -> float:
    k = min(k, len(score))
    if k == 0:
        return math.nan
    a = set(np.argsort(-np.asarray(score), kind="mergesort")[:k].tolist())
    b = set(np.argsort(-np.asarray(effect), kind="mergesort")[:k].tolist())
    return len(a & b) / k


def _finite(x) -> list[float]:
    return [v for v in x if v is not None and not math.isnan(v)]


def nanmedian(x) -> float:
    """Median of the values that are numbers (a prompt with too few latents has no correlation)."""
    x = _finite(x)
    return float(np.median(x)) if x else math.nan


def nanmean(x) -> float:
    x = _finite(x)
    return float(np.mean(x)) if x else math.nan


def agreement(score, effect, k: int = 10) -> dict[str, float]:
    return {"spearman": spearman(score, effect), "pearson": pearson(score, effect),
            "topk_overlap": topk_overlap(score, effect, k)}

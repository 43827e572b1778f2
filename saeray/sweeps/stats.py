"""Statistics the look-up sweep reports: the two-sample Kolmogorov-Smirnov test (the paper's head
ablation check, methods.md §5.6) and balanced accuracy of a yes/no classifier (its explanation
score), with unparseable answers counted, never dropped.

The KS p-value is exact for samples up to ``EXACT_MAX`` pairs (the probability, under the null,
that a random split of the pooled sample gives a statistic at least as large, counted by
lattice-path dynamic programming as in Hodges 1958), and the asymptotic Kolmogorov distribution
with Stephens' small-sample correction above that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

EXACT_MAX = 10_000      # n·m up to which the p-value is computed exactly


def ks_statistic(a, b) -> float:
    """D = sup_x |F_a(x) − F_b(x)|."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _p_exact(n: int, m: int, d: float) -> float:
    """P(D ≥ d) for samples of sizes n and m with no ties: one minus the share of the C(n+m, n)
    lattice paths from (0, 0) to (n, m) that stay strictly inside |i/n − j/m| < d (exact integers)."""
    tol = 1e-12
    row = [0] * (m + 1)
    for i in range(n + 1):
        for j in range(m + 1):
            if abs(i / n - j / m) >= d - tol:
                row[j] = 0
            elif i or j:
                row[j] = (row[j] if i else 0) + (row[j - 1] if j else 0)
            else:
                row[j] = 1
    return float(1 - Fraction(row[m], math.comb(n + m, n)))


def _p_asymptotic(n: int, m: int, d: float) -> float:
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return 1.0
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(max(0.0, min(1.0, 2 * s)))


@dataclass(frozen=True)
class KS:
    d: float
    p: float
    n: int
    m: int


def ks_2samp(a, b) -> KS:
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return KS(math.nan, math.nan, n, m)
    d = ks_statistic(a, b)
    p = _p_exact(n, m, d) if n * m <= EXACT_MAX else _p_asymptotic(n, m, d)
    return KS(d, p, n, m)


@dataclass(frozen=True)
class Balanced:
    score: float          # (TPR + TNR) / 2; nan when one class is absent
    tp: int
    fn: int
    tn: int
    fp: int
    unparsed: int         # answers that were neither yes nor no: counted as wrong


def balanced_accuracy(truth: list[bool], answers: list[bool | None]) -> Balanced:
    tp = sum(1 for t, a in zip(truth, answers) if t and a is True)
    fn = sum(1 for t, a in zip(truth, answers) if t and a is not True)
    tn = sum(1 for t, a in zip(truth, answers) if not t and a is False)
    fp = sum(1 for t, a in zip(truth, answers) if not t and a is not False)
    unparsed = sum(1 for a in answers if a is None)
    if tp + fn == 0 or tn + fp == 0:
        return Balanced(math.nan, tp, fn, tn, fp, unparsed)
    return Balanced((tp / (tp + fn) + tn / (tn + fp)) / 2, tp, fn, tn, fp, unparsed)

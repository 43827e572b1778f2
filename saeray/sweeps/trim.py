"""Cutting an activating prompt (methods.md §5.3): end the document at the token where the neuron
fires most, then drop the longest prefix that keeps the activation at that last token at ≥ 0.8 of
its value, found by binary search over where the prompt starts (the authors' rule: it assumes the
activation falls as context is removed, and takes the first start that fails as the boundary)."""
from __future__ import annotations

from typing import Callable

KEEP = 0.8


def trim_many(seqs: list[list[int]], act_many: Callable[[list[list[int]]], list[float]], keep: float = KEEP,
              prefix: list[int] = ()) -> list[list[int]]:
    """:func:`trim` of many prompts with their binary searches in lockstep: each step evaluates one
    candidate start per unfinished prompt in one call of ``act_many`` (one batched forward)."""
    pre = list(prefix)
    full = act_many([pre + list(s) for s in seqs])
    lo = [0] * len(seqs)                          # start lo always qualifies; find the largest start that does
    hi = [len(s) - 1 for s in seqs]
    while True:
        open_ = [i for i in range(len(seqs)) if lo[i] < hi[i]]
        if not open_:
            return [list(s[lo[i]:]) for i, s in enumerate(seqs)]
        mids = [(lo[i] + hi[i] + 1) // 2 for i in open_]
        vals = act_many([pre + list(seqs[i][m:]) for i, m in zip(open_, mids)])
        for i, m, v in zip(open_, mids, vals):
            if v >= keep * full[i]:
                lo[i] = m
            else:
                hi[i] = m - 1


def trim(ids: list[int], act: Callable[[list[int]], float], keep: float = KEEP, prefix: list[int] = ()) -> list[int]:
    """The shortest suffix of ``ids`` (``prefix``, e.g. BOS, put back in front of every candidate)
    whose activation at its last token, ``act(prefix + suffix)``, is ≥ ``keep`` × that of all of ``ids``."""
    return trim_many([list(ids)], lambda ss: [act(s) for s in ss], keep, prefix)[0]

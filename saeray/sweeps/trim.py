"""Cutting an activating prompt (methods.md §5.3): end the document at the token where the neuron
fires most, then drop the longest prefix that keeps the activation at that last token at ≥ 0.8 of
its value, found by binary search over where the prompt starts (the authors' rule: it assumes the
activation falls as context is removed, and takes the first start that fails as the boundary)."""
from __future__ import annotations

from typing import Callable

KEEP = 0.8


def trim(ids: list[int], act: Callable[[list[int]], float], keep: float = KEEP, prefix: list[int] = ()) -> list[int]:
    """The shortest suffix of ``ids`` (``prefix``, e.g. BOS, put back in front of every candidate)
    whose activation at its last token, ``act(prefix + suffix)``, is ≥ ``keep`` × that of all of ``ids``."""
    full = act(list(prefix) + list(ids))
    lo, hi = 0, len(ids) - 1          # start lo always qualifies; find the largest start that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if act(list(prefix) + list(ids[mid:])) >= keep * full:
            lo = mid
        else:
            hi = mid - 1
    return list(ids[lo:])

"""Presence, time and scale thresholds and re-activations, over a table of scores.

Plain functions over ``{(size, step, layer, concept): score}`` (size: the model's position in the
spec's list, smallest first; step: the checkpoint's training step). Definitions (ours: the paper's
are not public, docs/emergence.md):

* **present** at (size, step, layer): score >= threshold **and** score >= the same size and layer's
  score at step 0 + margin. The step-0 control removes concepts a random network already reads
  (a token-identity concept is linearly readable from a random embedding);
* present at (size, step): at some layer;
* **emergence step** (time threshold) per concept and size: the first checkpoint from which the
  concept stays present at every later checkpoint; None if it is not present at the last;
* **scale threshold** per concept and checkpoint: the smallest size where it is present;
* **re-activation** per concept, size and checkpoint: present at layer l1, absent at l2 > l1,
  present again at l3 > l2 (each absent gap between two present layers is one).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

Key = tuple[int, int, int, str]      # (size, step, layer, concept)


def step_of(revision: str, last: int | None = None) -> int | None:
    """``step<N>`` -> N; ``main`` -> ``last`` (the final step, when known); else None."""
    m = re.fullmatch(r"step(\d+)", revision)
    if m:
        return int(m.group(1))
    return last if revision == "main" else None


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def presence(scores: dict[Key, float], threshold: float, margin: float) -> dict[Key, bool]:
    """Present per key (see the module doc). Keys at step 0 are never present: they are the control."""
    steps = {s for _, s, _, _ in scores}
    if 0 not in steps:
        raise ValueError("presence needs the step-0 scores (the random-initialisation control)")
    out = {}
    for (z, s, l, c), v in scores.items():
        ctrl = scores.get((z, 0, l, c))
        out[(z, s, l, c)] = (s != 0 and _ok(v) and v >= threshold
                             and (not _ok(ctrl) or v >= ctrl + margin))
    return out


def present_any_layer(present: dict[Key, bool]) -> dict[tuple[int, int, str], bool]:
    out: dict[tuple[int, int, str], bool] = {}
    for (z, s, _l, c), p in present.items():
        out[(z, s, c)] = out.get((z, s, c), False) or p
    return out


def stays_from(steps: list[int], flags: list[bool]) -> int | None:
    """The first step from which every later flag is true; None if the last is false."""
    first = None
    for s, f in sorted(zip(steps, flags)):
        if f and first is None:
            first = s
        elif not f:
            first = None
    return first


def emergence_steps(present: dict[Key, bool]) -> dict[tuple[str, int], int | None]:
    """{(concept, size): emergence step or None}."""
    by = present_any_layer(present)
    groups: dict[tuple[str, int], list[tuple[int, bool]]] = {}
    for (z, s, c), p in by.items():
        groups.setdefault((c, z), []).append((s, p))
    return {k: stays_from([s for s, _ in v], [p for _, p in v]) for k, v in sorted(groups.items())}


def scale_thresholds(present: dict[Key, bool]) -> dict[tuple[str, int], int | None]:
    """{(concept, step): smallest size where present, or None}."""
    by = present_any_layer(present)
    out: dict[tuple[str, int], int | None] = {}
    for (z, s, c), p in sorted(by.items()):
        cur = out.get((c, s))
        if p and (cur is None or z < cur):
            out[(c, s)] = z
        else:
            out.setdefault((c, s), cur)
    return out


@dataclass(frozen=True)
class Reactivation:
    concept: str
    size: int
    step: int
    first: int              # l1: the last present layer before the gap
    absent: tuple[int, ...]  # the layers of the gap
    again: int              # l3: the first present layer after it


def reactivations(present: dict[Key, bool]) -> list[Reactivation]:
    groups: dict[tuple[str, int, int], list[tuple[int, bool]]] = {}
    for (z, s, l, c), p in present.items():
        groups.setdefault((c, z, s), []).append((l, p))
    out = []
    for (c, z, s), v in sorted(groups.items()):
        v.sort()
        last_present, gap = None, []
        for layer, p in v:
            if p:
                if last_present is not None and gap:
                    out.append(Reactivation(c, z, s, last_present, tuple(gap), layer))
                last_present, gap = layer, []
            elif last_present is not None:
                gap.append(layer)
    return out


def layer_profile(scores: dict[Key, float], concept: str, size: int, step: int) -> list[tuple[int, float]]:
    return sorted((l, v) for (z, s, l, c), v in scores.items() if (c, z, s) == (concept, size, step))

"""Features matched across checkpoints and layers by decoder cosine, and their lineages.

Two SAEs' features are compared through their decoder directions (unit rows of W_dec), data-free,
as Feature Flow matches across layers and GBA's MCS compares dictionaries:

* **max-cosine**: each feature's best cosine in the other SAE (many-to-one allowed);
* **one-to-one**: the assignment maximising the summed cosine (Hungarian,
  ``scipy.optimize.linear_sum_assignment``); a pair counts as the same feature at cosine >= ``thr``.

A **lineage** follows a feature through consecutive checkpoints of one (size, layer) along the
one-to-one matches at >= ``thr``: it is *born* at the first checkpoint it has no predecessor, *dies*
after the last checkpoint it has a successor, and its *drift* is the cosine between its direction
at birth and at the end of its life. Indices are the SAEs' own, so SAEs trained independently
(not warm-started) still match: the assignment, not the index, carries identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit_rows(w: np.ndarray, dtype=np.float64) -> np.ndarray:
    w = np.asarray(w, dtype=dtype)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n_a, n_b] cosines between decoder rows (features x d)."""
    return unit_rows(a) @ unit_rows(b).T


def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment maximising the summed cosine: (rows, cols)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(-c)


def summary(c: np.ndarray, thr: float) -> dict:
    """How alike two dictionaries are: max-cosine both ways, one-to-one mean and matched share."""
    r, k = assign(c)
    one = c[r, k]
    return {"n_a": int(c.shape[0]), "n_b": int(c.shape[1]),
            "maxcos_a": float(c.max(1).mean()), "maxcos_b": float(c.max(0).mean()),
            "matched_maxcos": float((c.max(1) >= thr).mean()),
            "one_to_one_mean": float(one.mean()), "matched_one_to_one": float((one >= thr).sum() / c.shape[0]),
            # warm-started SAEs keep their indices: the share of matched pairs that kept theirs
            "same_index": float(((r == k) & (one >= thr)).sum() / max(1, (one >= thr).sum()))}


def successors(c: np.ndarray, thr: float) -> dict[int, int]:
    """{feature in a: its one-to-one match in b} for pairs at cosine >= ``thr``."""
    r, k = assign(c)
    return {int(i): int(j) for i, j in zip(r, k) if c[i, j] >= thr}


@dataclass
class Lineage:
    features: list[tuple[int, int]]        # (checkpoint position, feature index), oldest first
    drift: float                           # cosine between the first and the last direction

    @property
    def born(self) -> int:
        return self.features[0][0]

    @property
    def last(self) -> int:
        return self.features[-1][0]


def lineages(decoders: list[np.ndarray], thr: float) -> list[Lineage]:
    """Lineages through consecutive dictionaries ``decoders`` (oldest first, [features, d] each)."""
    units = [unit_rows(w) for w in decoders]
    open_: dict[int, list[tuple[int, int]]] = {}
    done: list[list[tuple[int, int]]] = []
    for t, u in enumerate(units):
        if t == 0:
            open_ = {i: [(0, i)] for i in range(len(u))}
            continue
        nxt = successors(units[t - 1] @ u.T, thr)
        new: dict[int, list[tuple[int, int]]] = {}
        for i, chain in open_.items():
            if i in nxt:
                new[nxt[i]] = chain + [(t, nxt[i])]
            else:
                done.append(chain)
        for j in range(len(u)):
            new.setdefault(j, [(t, j)])
        open_ = new
    done.extend(open_.values())
    out = []
    for chain in done:
        (t0, i0), (t1, i1) = chain[0], chain[-1]
        out.append(Lineage(chain, float(units[t0][i0] @ units[t1][i1])))
    return sorted(out, key=lambda x: x.features)


def lineage_counts(lins: list[Lineage], n_checkpoints: int) -> list[dict]:
    """Per checkpoint position: features alive, born there, dying after it (no successor)."""
    out = []
    for t in range(n_checkpoints):
        alive = [l for l in lins if l.born <= t <= l.last]
        out.append({"alive": len(alive), "born": sum(1 for l in lins if l.born == t and t > 0),
                    "died": sum(1 for l in lins if l.last == t and t < n_checkpoints - 1)})
    return out


def lineage_of(lins: list[Lineage], t: int, feature: int) -> Lineage | None:
    for l in lins:
        if (t, feature) in l.features:
            return l
    return None

"""Ground-truth concepts (storyworld runs): for each planted label, the single latent that detects
it best, scored by F1 (latent fires = predicted positive) and by AUROC of its activation value.

Concepts are binary token labels derived from the storyworld label columns (docs/storyworld.md):
one per category, topic, fact relation and copy kind value; the boolean columns as they are; and
``depth > 0`` / ``count > 0`` for the counters. Positions follow the harvest convention: row
``(doc, pos)`` is the token the model sees at ``pos`` (0 = BOS).

Scoring is two-pass and streaming so it never holds a [tokens x width] matrix: pass 1 accumulates,
per latent, how often it fires and how often it fires on each concept (F1 for every latent at
once); pass 2 keeps only the chosen latent's values per concept for an exact AUROC.
"""
from __future__ import annotations

import numpy as np
import torch

F1_FOUND = 0.8
MIN_POSITIVES = 20          # concepts rarer than this in the held-out tokens are not scored
_BOOL = ("in_quote", "is_fact_answer", "is_copy_target", "next_is_fact_answer", "next_is_copy_target")
_CATEGORICAL = ("category", "topic", "fact_relation", "copy_kind")
_COUNTERS = ("depth", "count")


def storyworld_concepts(contexts, seed: int) -> tuple[list[str], np.ndarray]:
    """Concept names and a bool matrix [rows, concepts] aligned with ``contexts.keep`` (row order =
    ``contexts.ids[contexts.keep]``)."""
    from ..storyworld.generator import generate_doc, labels_table

    T = contexts.ids.shape[1]
    tab = labels_table(generate_doc(int(d), seed=seed, split="heldout") for d in contexts.doc).to_pydict()
    n_docs = len(contexts.doc)
    # index the label rows by (context row, pos); contexts truncate documents at T
    doc_row = {int(d): i for i, d in enumerate(contexts.doc)}
    keep = contexts.keep
    sel = [(doc_row[d], p) for d, p in zip(tab["doc"], tab["pos"]) if p < T]
    idx = np.array([i for i, (r, p) in enumerate(zip(tab["doc"], tab["pos"])) if p < T])
    flat = np.full((n_docs, T), -1, dtype=np.int64)
    for j, (r, p) in zip(idx, sel):
        flat[r, p] = j
    rows = flat[keep]
    if (rows < 0).any():
        raise ValueError("held-out contexts hold tokens without storyworld labels (is the corpus storyworld?)")
    return concept_matrix(tab, rows)


def concept_matrix(tab: dict, rows: np.ndarray, min_positives: int = MIN_POSITIVES) -> tuple[list[str], np.ndarray]:
    """Concept names and a bool matrix [len(rows), concepts] from a storyworld labels table (as a
    dict of columns) and the table rows of the tokens; concepts with fewer than ``min_positives``
    positives are left out."""
    names: list[str] = []
    cols: list[np.ndarray] = []
    for c in _BOOL:
        if c in tab:
            names.append(c)
            cols.append(np.asarray(tab[c], dtype=bool)[rows])
    for c in _COUNTERS:
        if c in tab:
            names.append(f"{c}>0")
            cols.append(np.asarray(tab[c])[rows] > 0)
    for c in _CATEGORICAL:
        if c not in tab:
            continue
        vals = np.asarray([v if v is not None else "" for v in tab[c]], dtype=object)[rows]
        for v in sorted({v for v in vals if v not in ("", "none")}):
            names.append(f"{c}={v}")
            cols.append(vals == v)
    m = np.stack(cols, 1)
    ok = m.sum(0) >= min_positives
    return [n for n, k in zip(names, ok) if k], m[:, ok]


class ConceptScorer:
    """Accumulates firing counts of one SAE's latents against concept labels (pass 1), then the
    chosen latent values (pass 2)."""

    def __init__(self, width: int, n_concepts: int):
        self.width, self.n = width, n_concepts
        self.fires = torch.zeros(width, dtype=torch.float64)
        self.hits = torch.zeros(n_concepts, width, dtype=torch.float64)
        self.pos = torch.zeros(n_concepts, dtype=torch.float64)
        self.best: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add_counts(self, latents: torch.Tensor, y: torch.Tensor) -> None:
        f = (latents > 0).double()
        yd = y.double()
        self.fires += f.sum(0)
        self.hits += yd.T @ f
        self.pos += yd.sum(0)

    def merge_counts(self, other: "ConceptScorer") -> "ConceptScorer":
        """Add another scorer's pass-1 counts (evaluation items are scored apart and summed)."""
        self.fires += other.fires
        self.hits += other.hits
        self.pos += other.pos
        return self

    def choose(self) -> None:
        f1 = 2 * self.hits / (self.fires[None, :] + self.pos[:, None]).clamp_min(1e-12)
        self.f1_all = f1
        self.best = f1.argmax(1)

    def add_values(self, latents: torch.Tensor, y: torch.Tensor) -> None:
        self.values.append(latents[:, self.best].float().cpu())
        self.labels.append(y.cpu())

    def result(self, names: list[str]) -> dict:
        v = torch.cat(self.values).numpy()
        y = torch.cat(self.labels).numpy()
        per = {}
        for j, name in enumerate(names):
            per[name] = {"latent": int(self.best[j]), "f1": float(self.f1_all[j, self.best[j]]),
                         "auroc": auroc(v[:, j], y[:, j]), "positives": int(self.pos[j])}
        found = sum(1 for r in per.values() if r["f1"] >= F1_FOUND)
        return {"concepts": per, "n_concepts": len(names), f"concepts_f1_{F1_FOUND}": found,
                "mean_best_f1": float(np.mean([r["f1"] for r in per.values()])) if per else 0.0}


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half."""
    y = y.astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, cnt = np.unique(score, return_inverse=True, return_counts=True)
    end = np.cumsum(cnt)
    r = ((end - cnt + 1 + end) / 2)[inv]   # 1-based ranks, ties share their average rank
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

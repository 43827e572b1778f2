"""Which latents of an SAE get a dashboard, and why (each group labelled on the page).

Narrow SAEs (``all_up_to``) show every latent, dead ones included (a dead latent is a finding).
Wider ones show, in this order: each planted concept's best latent (storyworld runs), the most
frequently firing, the most influential by mean GradSAE score (when a GradSAE sweep covered the
SAE), and a uniform random sample of the latents that fired, so the page is not only the
extremes. A latent in several groups is listed once with all its groups.
"""
from __future__ import annotations

import numpy as np


def select(counts: np.ndarray, opts, influence: dict[int, float] | None = None,
           concept_latents: list[int] | None = None) -> dict[int, list[str]]:
    """latent -> its groups, for an SAE whose per-latent firing counts are ``counts``."""
    width = len(counts)
    if width <= opts.all_up_to:
        return {i: ["all"] for i in range(width)}
    out: dict[int, list[str]] = {}

    def add(latents, group: str) -> None:
        for i in latents:
            out.setdefault(int(i), []).append(group)

    add(sorted(set(concept_latents or [])), "concept")
    fired = np.nonzero(counts > 0)[0]
    by_count = fired[np.argsort(-counts[fired], kind="stable")]
    add(by_count[:opts.frequent], "frequent")
    if influence:
        ranked = sorted(influence, key=lambda i: (-influence[i], i))
        add([i for i in ranked if influence[i] > 0][:opts.influential], "influential")
    rest = np.array([i for i in fired.tolist() if i not in out], dtype=np.int64)
    if len(rest) and opts.random:
        rng = np.random.default_rng(opts.seed)
        add(np.sort(rng.choice(rest, size=min(opts.random, len(rest)), replace=False)), "random")
    return dict(sorted(out.items()))

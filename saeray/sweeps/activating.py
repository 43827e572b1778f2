"""The documents that fire a neuron most (methods.md §5.3): over a corpus of contexts, each
neuron's maximal activation per context (at the positions the harvest keeps) and where it is; the
``top`` contexts per neuron, ready to be cut at that position and trimmed (:mod:`.trim`). The
activation is the MLP's post-nonlinearity value (``mlp_post.L``: act(x·W_in), or act(x·W_gate)·(x·W_in)
for a gated MLP)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Hit:
    context: int        # row of the corpus
    position: int       # where the neuron fires most in it
    value: float


@torch.no_grad()
def top_activating(model, ids: np.ndarray, keep: np.ndarray, neurons: list[tuple[int, int]], top: int = 20,
                   batch: int = 16) -> dict[tuple[int, int], list[Hit]]:
    """(layer, neuron) -> its ``top`` contexts by maximal activation, highest first (ties: lower row)."""
    layers = sorted({l for l, _ in neurons})
    names = [f"mlp_post.{l}" for l in layers]
    dev = next(model.parameters()).device
    best: dict[tuple[int, int], list[Hit]] = {n: [] for n in neurons}
    for a in range(0, len(ids), batch):
        x = torch.from_numpy(np.array(ids[a:a + batch])).to(dev)      # a copy: store arrays are read-only
        k = torch.from_numpy(np.array(keep[a:a + batch])).to(dev)
        acts = model(x, capture=names, logits=False).acts
        for l, i in neurons:
            v = acts[f"mlp_post.{l}"][..., i].float().masked_fill(~k, float("-inf"))
            val, pos = v.max(1)
            hits = best[(l, i)] + [Hit(a + r, int(pos[r]), float(val[r])) for r in range(len(x)) if bool(k[r].any())]
            best[(l, i)] = sorted(hits, key=lambda h: (-h.value, h.context))[:top]
    return best

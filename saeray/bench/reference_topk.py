"""The floor every architecture is measured against: the simplest TopK SAE loop a reader would
write in an afternoon. Adam at one fixed learning rate, unit-norm decoder rows, decoder bias at the
data mean, no AuxK, no warm-up or decay, no geometric median, no input scaling beyond what the
data has, no parallel-gradient removal. If saeray's TopK does not beat this, its tricks are not
earning their keep (docs/benchmarks.md, "Recovery across a family").
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


REFERENCE_LR = 1e-3


def train_reference_topk(batches: Iterable[np.ndarray], d: int, width: int, k: int, lr: float = REFERENCE_LR,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Train on every batch once; returns the parameters (``W_dec`` rows are the directions)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec.requires_grad_(True)
    W_enc = W_dec.detach().t().clone().requires_grad_(True)
    b_enc = torch.zeros(width, requires_grad=True)
    b_dec = None
    opt = None
    for x in batches:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if b_dec is None:
            b_dec = x.mean(0).clone().requires_grad_(True)
            opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
        z = reference_encode({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec}, x, k)
        loss = (z @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(), "b_dec": b_dec.detach()}


def reference_encode(p: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())

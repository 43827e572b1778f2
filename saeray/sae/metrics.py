"""Standard SAE metrics (methods.md §6.1, §6.3), computed on held-out activations in raw units.

* MSE: mean over tokens of ‖x − x̂‖² summed over d.
* FVU: Σ‖x − x̂‖² / Σ‖x − x̄‖² pooled over all tokens (x̄ = mean of the evaluated tokens);
  explained variance = 1 − FVU.
* L0: mean number of non-zero latents per token.
* dead fraction: latents that never fired on the evaluated tokens (eval-time), or, from training,
  latents that did not fire in the last N tokens (:func:`dead_fraction`).
* dense fraction: latents firing on more than 10 % of tokens.
* frequency histogram: counts of log10(firing frequency) in fixed bins; dead latents counted apart.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FREQ_BINS = [-10, -6, -5, -4, -3, -2, -1, 0.0001]   # log10 edges; first bin = "< 1e-6"


def fvu(x: Tensor, xh: Tensor) -> float:
    x, xh = x.double(), xh.double()
    return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def dead_fraction(tokens_since_fired: Tensor, window: int) -> float:
    return float((tokens_since_fired >= window).float().mean())


def freq_histogram(freq: Tensor) -> dict:
    f = freq.double().cpu().numpy()
    dead = int((f == 0).sum())
    counts, _ = np.histogram(np.log10(f[f > 0]), bins=FREQ_BINS)
    return {"dead": dead, "log10_edges": FREQ_BINS, "counts": counts.tolist()}


class RunningMetrics:
    """The figures of :func:`evaluate`, accumulated batch by batch (raw-unit activations, their
    reconstructions and latents), so a caller streaming tokens never holds them all."""

    def __init__(self, width: int):
        self.n = 0
        self.sq_err = 0.0
        self.sq = 0.0
        self.l0 = 0.0
        self.sum: Tensor | None = None
        self.fires = torch.zeros(width, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: Tensor, recon: Tensor, latents: Tensor) -> None:
        xd = x.double()
        self.sq_err += float((xd - recon.double()).pow(2).sum())
        s = xd.sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.sq += float(xd.pow(2).sum())
        self.n += x.shape[0]
        active = latents != 0
        self.l0 += float(active.sum())
        self.fires += active.sum(0).double().cpu()

    def merge(self, other: "RunningMetrics") -> "RunningMetrics":
        """Add another accumulator's tokens (evaluation items are scored apart and summed)."""
        self.n += other.n
        self.sq_err += other.sq_err
        self.sq += other.sq
        self.l0 += other.l0
        if other.sum is not None:
            self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum
        self.fires += other.fires
        return self

    def result(self) -> dict:
        n = max(self.n, 1)
        total_var = self.sq - (float(self.sum.pow(2).sum()) / n if self.sum is not None else 0.0)
        freq = self.fires / n
        return {
            "tokens": self.n,
            "mse": self.sq_err / n,
            "fvu": self.sq_err / max(total_var, 1e-30),
            "l0": self.l0 / n,
            "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > 0.1).double().mean()),
            "freq_hist": freq_histogram(freq),
            "freq": freq,
        }


@torch.no_grad()
def evaluate(sae, x: Tensor | np.ndarray, batch_size: int = 4096) -> dict:
    """Metrics of ``sae`` (any :class:`saeray.sae.base.SAE`) on activations ``x`` [N, d_in]."""
    was_training = sae.training
    sae.eval()
    dev = next(iter(sae.buffers())).device
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    acc = RunningMetrics(sae.width)
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(dev)
        out = sae(xb)
        acc.add(xb, out.recon, out.latents)
    sae.train(was_training)
    return acc.result()

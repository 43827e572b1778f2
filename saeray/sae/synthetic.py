"""Planted-feature activations after the GBA paper's statistical model (Chen et al. 2025 §3;
methods.md §1.1): rows x = Σ_i h_i v_i + noise with n unit directions v_i in d dimensions (n > d,
superposition) and a sparse non-negative code h.

OUR CHOICES (the paper's magnitude and noise distributions are not in our sources):
* v_i: rows of an i.i.d. Gaussian matrix, normalised to unit norm;
* feature i occurs with its own frequency f_i; by default the n frequencies are geometrically
  spaced over [f_min, f_max] and assigned to features in random order, so every seed sees the same
  frequency profile and true L0 (``spacing="random"``: i.i.d. log-uniform draws, which with n = 128
  moved the true L0 between 4.4 and 5.9 across seeds and left the rarest decile to chance);
* correlated groups: a fraction ``corr_frac`` of the features is split into groups of ``corr_size``;
  a member fires when a uniform draw falls below its frequency, and with probability ``corr`` that
  draw is the group's shared one (comonotone coupling), else its own. Marginal frequencies are
  exactly f_i while the rarer member of a group mostly fires together with the others — the
  co-occurrence that makes SAEs merge or absorb features;
* magnitudes of active features: ``"uniform"`` i.i.d. U[mag_low, mag_high] (default [0.5, 1.5]) or
  ``"lognormal"`` exp(N(0, mag_sigma²)) scaled to mean 1 (heavy right tail);
* noise σ·N(0, I_d), σ = 0.01 by default.

Batches are a pure function of (seed, batch index), so ``batches(skip_tokens)`` resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class PlantedFeatures:
    d: int = 64
    n: int = 256
    f_min: float = 1e-3
    f_max: float = 1e-1
    mag_low: float = 0.5
    mag_high: float = 1.5
    noise: float = 0.01
    seed: int = 0
    spacing: str = "geometric"   # or "random": i.i.d. log-uniform frequencies
    magnitude: str = "uniform"   # or "lognormal"
    mag_sigma: float = 0.75      # lognormal shape
    corr_frac: float = 0.0       # share of features in correlated groups
    corr_size: int = 2
    corr: float = 0.8            # probability a group member uses the group's shared draw

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        V = rng.standard_normal((self.n, self.d))
        self.V = (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32)
        if self.spacing == "geometric":
            self.freq = rng.permutation(np.geomspace(self.f_max, self.f_min, self.n))
        elif self.spacing == "random":
            self.freq = np.exp(rng.uniform(np.log(self.f_min), np.log(self.f_max), self.n))
        else:
            raise ValueError(f"spacing='{self.spacing}' must be 'geometric' or 'random'")
        if self.magnitude not in ("uniform", "lognormal"):
            raise ValueError(f"magnitude='{self.magnitude}' must be 'uniform' or 'lognormal'")
        # group id of each feature (-1: independent); groups are random subsets
        n_corr = int(round(self.corr_frac * self.n)) // self.corr_size * self.corr_size
        self.group = np.full(self.n, -1)
        members = rng.permutation(self.n)[:n_corr]
        self.group[members] = np.arange(n_corr) // self.corr_size
        self.n_groups = n_corr // self.corr_size

    def _magnitudes(self, shape, rng: np.random.Generator) -> np.ndarray:
        if self.magnitude == "uniform":
            return rng.uniform(self.mag_low, self.mag_high, shape)
        return np.exp(self.mag_sigma * rng.standard_normal(shape) - self.mag_sigma ** 2 / 2)

    def sample(self, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(x [rows, d] float32, h [rows, n] float32 true code)."""
        u = rng.random((rows, self.n))
        if self.n_groups:
            shared = rng.random((rows, self.n_groups))
            use = (self.group >= 0) & (rng.random((rows, self.n)) < self.corr)
            u = np.where(use, shared[:, np.maximum(self.group, 0)], u)
        active = u < self.freq
        h = np.where(active, self._magnitudes((rows, self.n), rng), 0.0).astype(np.float32)
        x = h @ self.V
        if self.noise:
            x += (self.noise * rng.standard_normal((rows, self.d))).astype(np.float32)
        return x.astype(np.float32), h

    def batch(self, index: int, batch_size: int, stream: int = 1) -> np.ndarray:
        return self.sample(batch_size, np.random.default_rng([self.seed, stream, index]))[0]

    def batches(self, batch_size: int, tokens: int | None = None, stream: int = 1):
        """A ``batches(skip_tokens)`` callable for :func:`saeray.sae.train.fit` (skip must be a
        multiple of batch_size, which it is for checkpoints taken at step boundaries)."""
        def gen(skip: int = 0) -> Iterator[np.ndarray]:
            if skip % batch_size:
                raise ValueError(f"skip={skip} is not a multiple of batch_size={batch_size}")
            i = skip // batch_size
            while tokens is None or i * batch_size < tokens:
                yield self.batch(i, batch_size, stream)
                i += 1
        return gen

    def expected_l0(self) -> float:
        return float(self.freq.sum())


def recovery(directions: np.ndarray, V: np.ndarray, tau: float = 0.9) -> dict:
    """Best cosine of each true direction against the learned unit directions [width, d]."""
    D = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    best = (V @ D.T).max(1)
    return {"frr": float((best >= tau).mean()), "mean_best_cos": float(best.mean()), "best_cos": best}


def consistency(a: np.ndarray, b: np.ndarray, tau: float = 0.9, alive: np.ndarray | None = None) -> float:
    """Fraction of latents of run ``a`` whose direction has cosine ≥ tau with some latent of ``b``."""
    A = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    B = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    best = (A @ B.T).max(1)
    if alive is not None:
        best = best[alive]
    return float((best >= tau).mean()) if len(best) else 0.0

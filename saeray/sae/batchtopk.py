"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410; bartbussmann/BatchTopK; methods.md §2.4).

Training: over a batch of B tokens keep the round(B·k) largest of the B×width values ReLU(pre), so
the number of active latents varies per token and averages k. Same AuxK loss as TopK.

k is a mean, so it may be fractional (SAELens's BatchTopK takes a float k too), and it should be
set to the mean number of features a token carries, *without* TopK's slack: TopK needs k above the
mean because a token with more features than k loses them, while the batch budget already moves
slots to the tokens that need them. Every slot in the budget is filled, so a k above the data's L0
is spent on split and duplicated latents rather than left empty. On the planted family (1M tokens,
d = 32, true L0 1.41) recovery at cosine 0.9 was 0.95 at k = 1.41, 0.70 at 1.2 × that, 0.39 at
k = 3 (TopK's rule, ⌈1.5 L0⌉) and 0.20 at k = 6; docs/training.md says how to estimate the L0.
Pooling across tokens has a cost of its own under heavy superposition: on the family's d = 32,
8× setting the same code with the top-k over groups of G tokens recovered 0.85 at G = 1 (TopK),
0.72 at G = 2, 0.46 at G = 4 and 0.19 at G = 1024 (docs/benchmarks.md, "Why BatchTopK still misses").
Inference: one global threshold θ replaces the batch dependence, ``f = pre · 1[pre > θ]`` (a
JumpReLU with a shared θ); θ is an exponential moving average (rate 0.01, SAELens's choice; the
first batch sets it) of the smallest kept activation per training batch. Saved as a SAELens
``jumprelu`` SAE with θ broadcast to ``threshold [width]`` (what SAELens does for batchtopk).

Sparse decode (both modes): the kept entries become (token, latent, value) triplets sorted by
token, decoded by :func:`saeray.sae.sparse_decode.decode_coo` (one embedding_bag over all of
them, one bag per token, so tokens with many, few or no active latents cost what they hold).
Training keeps exactly B·k entries, the same work as TopK's sparse decode plus a sort of B·k
indices. Inference (``pre > θ``) adds a ``nonzero`` over [B, width]; it still beats the dense
matmul unless the code is dense: eval forward at B=1024, width 16384, d=768 on the 2-core sandbox
(shared) took 0.66-0.78 s sparse vs 1.15-1.28 s dense at 0.2-1 % active, 0.88 vs 1.2 s at 5 %,
and the two were level at 20 %.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import SAEOutput
from .sparse_decode import decode_coo
from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_arch = "jumprelu"

    def __init__(self, d_in: int, width: int, k: float = 32, aux_alpha: float = 1 / 32,
                 k_aux: int | None = None, threshold_rate: float = 0.01):
        if not 0 < k <= width:
            raise ValueError(f"k={k:g} must be in (0, width={width}]")
        super().__init__(d_in, width, k=max(1, math.ceil(k)), aux_alpha=aux_alpha, k_aux=k_aux)
        self.k = float(k)
        self.threshold_rate = float(threshold_rate)
        self.register_buffer("threshold", torch.full((), -1.0))   # < 0: not estimated yet

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(xs)
        if self.training or self.threshold < 0:
            acts = pre.relu()
            flat = acts.flatten()
            v, i = flat.topk(self._budget(acts.shape[0]))
            f = torch.zeros_like(flat).scatter_(0, i, v).view_as(acts)
            return f, pre
        return pre * (pre > self.threshold), pre

    def _budget(self, n_tok: int) -> int:
        """Latents kept in a batch of ``n_tok`` tokens: round(k·B), at least one."""
        return min(max(1, round(self.k * n_tok)), n_tok * self.width)

    def sparse_code(self, pre: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        n_tok = pre.shape[0]
        if self.training or self.threshold < 0:
            flat = pre.relu().flatten()
            v, i = flat.topk(self._budget(n_tok))
            i, order = i.sort()             # decode_coo wants the entries grouped by token
            v = v[order]
            rows, cols = i // self.width, i % self.width
        else:
            rows, cols = (pre > self.threshold).nonzero(as_tuple=True)   # row-major: sorted by token
            v = pre[rows, cols]
        return decode_coo(rows, cols, v, self.W_dec, n_tok), (rows, cols, v.detach())

    @torch.no_grad()
    def on_step(self, out: SAEOutput, n_tokens: int) -> None:
        super().on_step(out, n_tokens)
        pos = out.positive_values()
        if pos.numel():
            m = pos.min().float()
            if self.threshold < 0:
                self.threshold.copy_(m)
            else:
                self.threshold.lerp_(m, self.threshold_rate)

    def hparams(self) -> dict:
        return {**super().hparams(), "k": self.k, "threshold_rate": self.threshold_rate}

    def saelens_cfg(self) -> dict:
        return {}

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        t = super().export()
        t["threshold"] = self.threshold.float().clamp_min(0).expand(self.width).clone()
        return t

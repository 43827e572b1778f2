"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv 2406.04093; openai/sparse_autoencoder train.py; methods.md §2.3).

    z = ReLU(TopK_k(W_encᵀ(x − b_dec) + b_enc)),   x̂ = W_decᵀ z + b_dec
    L = ‖x − x̂‖² + α · ‖e − ê‖² / ‖e − ē‖²,  e = stopgrad(x − x̂),
    ê = W_decᵀ ReLU(TopK_{k_aux}(pre restricted to dead latents))

A latent is dead when it has not fired for ``dead_tokens`` tokens (paper: 10M; the trainer sets it
from ``TrainConfig.dead_window_tokens``). α = 1/32. ``k_aux`` defaults to d_in/2
(dictionary_learning's reading of App. B.1; the OpenAI release uses 256), capped at the number of
dead latents. With a small k ``k_aux = 2k`` recovered more planted features where k = 1 (family
d32-8x-rare, two seeds: 0.834 → 0.881, level with the plain reference loop) and moved the other
settings by at most 0.006; our reading: the residual of a k = 1 code is mostly one missed feature,
which two dead latents can take and sixteen only share. On storyworld and SmolLM2 activations it
made no measurable difference (held-out FVU within 5e-5); it is not the default yet because it would
change the audits' SAEs and every figure measured with them (docs/benchmarks.md, "TopK against the
floor"). Decoder rows unit-norm with the parallel gradient removed; tied init; b_dec from the
geometric median (trainer). Our main term is the squared error on inputs scaled to E‖x‖² = 1, which
plays the role of the paper's normalised MSE.

Decoding (training and inference, main and AuxK terms) is sparse: the top-k (values, indices) the
encoder selects go straight to :func:`saeray.sae.sparse_decode.decode_topk` instead of a dense
[B, width] @ [width, d] matmul. The output carries the code as (row, col, value) triplets;
``SAEOutput.latents`` (the dense code, no gradient) is built only when read (metrics, evaluation,
data-parallel gathering), and the per-step statistics use the triplets. ``sparse_decode = False`` (class or
instance) restores the dense decode, for the equivalence tests and the before/after benchmark.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE, SAEOutput, mse
from .sparse_decode import decode_topk


def topk_relu(pre: Tensor, k: int) -> Tensor:
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, i, v.relu())


class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"
    sparse_decode = True    # False: decode with the dense matmul (the base-class path)

    def __init__(self, d_in: int, width: int, k: int = 32, aux_alpha: float = 1 / 32, k_aux: int | None = None):
        super().__init__(d_in, width)
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be in 1..width={width}")
        self.k, self.aux_alpha = int(k), float(aux_alpha)
        self.k_aux = int(k_aux) if k_aux else max(1, d_in // 2)
        self._init_standard()

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(xs)
        return topk_relu(pre, self.k), pre

    def sparse_code(self, pre: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """(x̂ − b_dec in scaled space, differentiable; the code as (rows, cols, vals) triplets
        sorted by row, without gradient)."""
        v, i = pre.topk(self.k, dim=-1, sorted=False)   # a sum needs no order: 1.3 → 0.8 ms at [1024, 256]
        v = v.relu()
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)
        return decode_topk(i, v, self.W_dec), (rows, i.flatten(), v.detach().flatten())

    def forward(self, x: Tensor) -> SAEOutput:
        if not self.sparse_decode:
            return super().forward(x)
        xs = x * self.input_scale
        pre = self.pre_acts(xs)
        xh, codes = self.sparse_code(pre)
        xh = xh + self.b_dec
        losses = self.loss_terms(xs, xh, None, pre) if self.training else {"mse": mse(xh, xs)}
        return SAEOutput(xh / self.input_scale, None, losses, pre, codes=codes, width=self.width)

    def aux_loss(self, xs: Tensor, xh: Tensor, pre: Tensor) -> Tensor:
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_alpha == 0:
            return xs.new_zeros((), dtype=torch.float32)
        e = (xs - xh).detach().float()
        if self.sparse_decode:
            # top-k over the dead columns only: the same latents as a top-k over pre with the live
            # ones masked to -inf, at the cost of n_dead columns instead of the width (at width 256
            # a second full top-k was a quarter of a step)
            cols = dead.nonzero().squeeze(1)
            v, j = pre.index_select(1, cols).topk(min(self.k_aux, n_dead), dim=-1, sorted=False)
            e_hat = decode_topk(cols[j], v.relu(), self.W_dec).float()
        else:
            masked = pre.masked_fill(~dead, float("-inf"))
            e_hat = (topk_relu(masked, min(self.k_aux, n_dead)) @ self.W_dec).float()
        denom = (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return self.aux_alpha * torch.nan_to_num((e_hat - e).pow(2).sum(-1).mean() / denom, 0.0)

    def loss_terms(self, xs, xh, f, pre):
        return {"mse": mse(xh, xs), "auxk": self.aux_loss(xs, xh, pre)}

    def hparams(self) -> dict:
        return {"k": self.k, "aux_alpha": self.aux_alpha, "k_aux": self.k_aux}

    def saelens_cfg(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

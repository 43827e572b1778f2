"""ReLU SAE with an L1 penalty weighted by decoder norms: the standard baseline (SAELens ``standard``).

    f = ReLU(W_encᵀ(x − b_dec) + b_enc),   x̂ = W_decᵀ f + b_dec
    L = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec[i]‖₂

(Anthropic "Towards Monosemanticity" / April-2024 update form; dictionary_learning ``standard.py``;
methods.md §2.0.) Choice: the decoder is *not* renormalised — weighting the L1 by the decoder norm
removes the incentive to shrink f by growing ‖W_dec[i]‖, and keeps the saved file a plain standard SAE.
"""
from __future__ import annotations

from torch import Tensor

from .base import SAE, mse


class ReLUSAE(SAE):
    arch = "relu"
    saelens_arch = "standard"
    unit_norm_decoder = False

    def __init__(self, d_in: int, width: int, l1: float = 1.0):
        super().__init__(d_in, width)
        self.l1 = float(l1)
        self._init_standard()

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(xs)
        return pre.relu(), pre

    def loss_terms(self, xs, xh, f, pre):
        return {"mse": mse(xh, xs), "l1": self.l1 * (f.float() * self.W_dec.norm(dim=1)).sum(-1).mean()}

    def hparams(self) -> dict:
        return {"l1": self.l1}

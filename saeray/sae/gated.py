"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014; dictionary_learning ``gdm.py``; SAELens ``gated_sae.py``; methods.md §2.1).

    x' = x − b_dec
    π_gate = W_encᵀ x' + b_gate,             g = 1[π_gate > 0]
    π_mag  = (W_enc ⊙ exp(r_mag))ᵀ x' + b_mag  (weights shared with the gate, one log-scale per latent)
    f = g ⊙ ReLU(π_mag),                     x̂ = W_decᵀ f + b_dec
    L = ‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − (W_dec*ᵀ ReLU(π_gate) + b_dec*)‖²

where * marks a stop-gradient (frozen decoder copy in the auxiliary term; the authors' ablation found
freezing helps). Choice: the *paper* form — plain L1 with unit-norm decoder rows (parallel gradient
removed) rather than SAELens's decoder-norm-weighted L1. Init: zero biases and r_mag, tied W_enc = W_decᵀ.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SAE, mse


class GatedSAE(SAE):
    arch = "gated"
    saelens_arch = "gated"

    def __init__(self, d_in: int, width: int, l1: float = 1.0):
        super().__init__(d_in, width)
        self.l1 = float(l1)
        self._init_standard()
        del self.b_enc
        self.b_gate = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))
        self.r_mag = nn.Parameter(torch.zeros(width))

    def _paths(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        xc = xs - self.b_dec
        gate = xc @ self.W_enc + self.b_gate
        mag = xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate, mag

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        gate, mag = self._paths(xs)
        return (gate > 0).to(mag.dtype) * mag.relu(), gate

    def loss_terms(self, xs, xh, f, pre):
        gate_act = pre.relu()
        aux = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        return {"mse": mse(xh, xs), "l1": self.l1 * gate_act.float().sum(-1).mean(), "aux": mse(aux, xs)}

    def hparams(self) -> dict:
        return {"l1": self.l1}

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        c = self.input_scale.float()
        return {"W_enc": self.W_enc.detach().float() * c, "b_gate": self.b_gate.detach().float().clone(),
                "r_mag": self.r_mag.detach().float().clone(), "b_mag": self.b_mag.detach().float().clone(),
                "W_dec": self.W_dec.detach().float() / c, "b_dec": self.b_dec.detach().float() / c}

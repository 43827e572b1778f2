"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders", arXiv 2407.14435; dictionary_learning ``jumprelu.py``; methods.md §2.2).

    π = W_encᵀ(x − b_dec) + b_enc,   f = JumpReLU_θ(π) = π ⊙ H(π − θ),   x̂ = W_decᵀ f + b_dec
    L = ‖x − x̂‖² + λ Σ_i H(π_i − θ_i)                     (L0 trained directly)

Straight-through pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
    ∂f/∂θ := −(θ/ε) K((π − θ)/ε),   ∂H/∂θ := −(1/ε) K((π − θ)/ε),   ∂f/∂π = H(π − θ),
and the L0 term sends no gradient to π. SAELens trains log θ and stores θ as ``threshold``.

Choices: θ itself is the parameter (as in dictionary_learning), clamped positive after each step, so
the saved ``threshold`` round-trips bit-exactly; ε = θ₀ = 0.001 (dictionary_learning, for inputs at
unit mean squared norm, which our trainer guarantees); unit-norm decoder rows; the plain λ·L0 penalty
of the paper (not dictionary_learning's target-L0 variant); no sparsity warm-up.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SAE, mse


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g * (pre > theta)
        g_theta = (g * (-(theta / eps)) * _rect((pre - theta) / eps)).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (g * (-1.0 / eps) * _rect((pre - theta) / eps)).sum(0)
        return torch.zeros_like(pre), g_theta, None


class JumpReLUSAE(SAE):
    arch = "jumprelu"
    saelens_arch = "jumprelu"

    def __init__(self, d_in: int, width: int, l1: float = 1.0, bandwidth: float = 0.001, theta0: float = 0.001):
        super().__init__(d_in, width)
        self.l1, self.bandwidth, self.theta0 = float(l1), float(bandwidth), float(theta0)
        self._init_standard()
        self.threshold = nn.Parameter(torch.full((width,), theta0))

    @torch.no_grad()
    def on_step(self, out, n_tokens: int) -> None:
        super().on_step(out, n_tokens)
        self.threshold.clamp_(min=1e-6)

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(xs)
        theta = self.threshold.to(pre.dtype)
        return _JumpReLU.apply(pre, theta, self.bandwidth), pre

    def loss_terms(self, xs, xh, f, pre):
        l0 = _Step.apply(pre, self.threshold.to(pre.dtype), self.bandwidth).float().sum(-1).mean()
        return {"mse": mse(xh, xs), "l0": self.l1 * l0}

    def hparams(self) -> dict:
        return {"l1": self.l1, "bandwidth": self.bandwidth, "theta0": self.theta0}

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        t = super().export()
        t["threshold"] = self.threshold.detach().float().clone()
        return t

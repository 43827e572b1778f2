"""GradSAE influence of every latent on one prompt (Shu et al., arXiv 2505.08080; methods.md §3,
wave2.md §1.1), its integrated-gradients variant and the activation baseline.

The latents at the hook point are a leaf spliced into the model (nothing upstream gets a gradient);
one backward pass of the output (default: the probability of the answer's first token at the
answer step) gives ∂y/∂f for every latent at every position, and

    g_{n,c} = relu(∂y/∂f_{n,c} · f_{n,c}),   score_c = (1/N) Σ_n g_{n,c}

with N the full sequence length (zeros included), as the authors' code divides. ``signed`` is the
first-order estimate of zeroing latent c at every position, Σ_n ∂y/∂f_{n,c} · f_{n,c}: what exact
ablation measures, sign kept. Integrated gradients replace the gradient at f by its mean along the
straight path 0 → f (``steps`` midpoints, all in one batched forward and backward), for where the
first-order approximation is poor. The activation baseline is (1/N) Σ_n f_{n,c}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .splice import Clean, decode, last_logits, output_of

AGGREGATES = ("mean", "sum", "last")


@dataclass(frozen=True)
class GradOptions:
    error_term: bool = False      # paper: dropped (the reconstruction alone is spliced in)
    aggregate: str = "mean"       # paper: mean over all positions; "sum"; "last" (answer step only)
    output: str = "prob"          # paper: probability; "logprob"; "logit_diff"
    ig_steps: int = 10            # integrated-gradients interpolation steps (0: not computed)


def _aggregate(per_pos: Tensor, n_positions: int, how: str) -> Tensor:
    """[K, width] per kept position -> [width]; the sequence has ``n_positions`` positions."""
    if how == "mean":
        return per_pos.sum(-2) / n_positions
    if how == "sum":
        return per_pos.sum(-2)
    if how == "last":
        return per_pos[..., -1, :]
    raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")


def _grad(model, sae, hookpoint: str, clean: Clean, F: Tensor, answer: int, opt: GradOptions) -> tuple[Tensor, Tensor]:
    """(y per row, ∂Σy/∂F) for latents ``F`` [R, K, width] spliced in."""
    F = F.detach().requires_grad_(True)
    with torch.enable_grad():
        new = decode(sae, F) + (clean.err if opt.error_term else 0.0)
        ids = clean.ids[None].expand(F.shape[0], -1)
        y = output_of(last_logits(model, hookpoint, ids, clean.keep, new, clean.hidden), answer, opt.output)
        (g,) = torch.autograd.grad(y.sum(), F)
    return y.detach(), g


def scores(model, sae, hookpoint: str, clean: Clean, answer: int, opt: GradOptions) -> dict[str, Tensor]:
    """Every latent's scores [width]: ``gradsae`` (the paper's), ``signed`` (first-order ablation
    estimate), ``activation`` (baseline), ``ig``/``ig_signed`` when ``opt.ig_steps``; and ``y``,
    the output with the SAE spliced in."""
    T = int(clean.ids.shape[0])
    y, g = _grad(model, sae, hookpoint, clean, clean.f[None], answer, opt)
    ga = (g[0] * clean.f)
    out = {"y": y[0], "gradsae": _aggregate(ga.relu(), T, opt.aggregate), "signed": ga.sum(0),
           "activation": _aggregate(clean.f, T, opt.aggregate)}
    if opt.ig_steps:
        out.update(integrated(model, sae, hookpoint, clean, answer, opt))
    return out


def integrated(model, sae, hookpoint: str, clean: Clean, answer: int, opt: GradOptions) -> dict[str, Tensor]:
    T = int(clean.ids.shape[0])
    alphas = (torch.arange(opt.ig_steps, device=clean.f.device, dtype=clean.f.dtype) + 0.5) / opt.ig_steps
    _, g = _grad(model, sae, hookpoint, clean, alphas[:, None, None] * clean.f[None], answer, opt)
    ig = clean.f * g.mean(0)
    return {"ig": _aggregate(ig.relu(), T, opt.aggregate), "ig_signed": ig.sum(0)}

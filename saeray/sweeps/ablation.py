"""Exact zero-ablation of SAE latents, many latents per forward pass (wave2.md §1.3): the ground
truth GradSAE approximates.

The decoder is linear, so zeroing latent i at every kept position changes the spliced activation by
exactly −f[:, i] ⊗ W_dec[i] (raw units): with the error term kept, row b of a batch is
``act − f[:, i_b] ⊗ W_dec[i_b]``; with it dropped, the same delta on the reconstruction. No row is
re-encoded, so a batch of B rows ablates B latents in one forward. The effect of latent i is
``y(unedited) − y(latent i zeroed)``, on the same output as the scores.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .splice import Clean, decode, last_logits, output_of


def _base(sae, clean: Clean, error_term: bool) -> Tensor:
    return clean.act if error_term else decode(sae, clean.f)


@torch.no_grad()
def exact_effects(model, sae, hookpoint: str, clean: Clean, latents: Tensor, answer: int, output: str = "prob",
                  error_term: bool = False, batch: int = 32) -> tuple[float, Tensor]:
    """(y unedited, effect per latent [len(latents)]), ``batch`` ablated latents per forward."""
    base = _base(sae, clean, error_term)
    W = sae.W_dec.float() / sae.input_scale
    y0 = output_of(last_logits(model, hookpoint, clean.ids[None], clean.keep, base[None], clean.hidden), answer, output)[0]
    effects = []
    for a in range(0, len(latents), batch):
        idx = latents[a:a + batch]
        rows = base[None] - clean.f[:, idx].t()[:, :, None] * W[idx][:, None, :]     # [B, K, d]
        ids = clean.ids[None].expand(len(idx), -1)
        effects.append(y0 - output_of(last_logits(model, hookpoint, ids, clean.keep, rows, clean.hidden), answer, output))
    return float(y0), torch.cat(effects) if effects else torch.zeros(0)


@torch.no_grad()
def effect_one(model, sae, hookpoint: str, clean: Clean, latent: int, answer: int, output: str = "prob",
               error_term: bool = False) -> float:
    """One latent zeroed in the code and the activation decoded again, each pass through the whole
    model: the slow reference the batched form must equal."""
    f = clean.f.clone()
    f[:, latent] = 0
    edited = decode(sae, f) + (clean.err if error_term else 0.0)
    y0 = output_of(last_logits(model, hookpoint, clean.ids[None], clean.keep, _base(sae, clean, error_term)[None]),
                   answer, output)[0]
    y = output_of(last_logits(model, hookpoint, clean.ids[None], clean.keep, edited[None]), answer, output)[0]
    return float(y0 - y)

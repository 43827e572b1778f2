"""Upstream attention heads of a next-token neuron (methods.md §5.4): which earlier heads write,
at the last position of a prompt, along the direction the neuron reads.

Score of head h of layer l < L on a prompt: its output at the last position (the per-head part
z_h·W_O[h] of the attention output, no bias) dotted with the neuron's input direction, the
pre-MLP norm's scale folded in (the authors' ``fold_ln``). For a gated (SwiGLU) MLP the direction is
the **gate** column: the gate decides whether the neuron fires (SiLU is near zero for a negative
gate), while the up path only scales it, so a head that switches the neuron on writes along the
gate. A head is active on a prompt when its score exceeds the mean + 2σ of that prompt's head
scores; a (neuron, head) pair is worth explaining when the head is active on 25-75 % of the
neuron's prompts, so both kinds of example exist.

The paper's ablation check zeroes a head's value vectors and measures the change in the neuron's
token probability; zeroing the values zeroes the head's output, which is what
:func:`ablation_effects` does (an ``attn_head_out`` intervention).
"""
from __future__ import annotations

import torch

from ..models.arch import view
from .splice import logits_at_last

ACTIVE_SIGMAS = 2.0
PAIR_RANGE = (0.25, 0.75)


def input_direction(model, layer: int, neuron: int) -> torch.Tensor:
    """[d_model]: what neuron ``neuron`` of ``layer`` reads from the residual stream."""
    arch = view(model)
    W = arch.W_gate(layer)
    W = arch.W_in(layer) if W is None else W
    w = W[:, neuron].detach().float()
    gamma = getattr(arch.ln_mlp(layer), "weight", None)
    return w * gamma.detach().float() if gamma is not None else w


@torch.no_grad()
def head_scores(model, ids: list[int], layer: int, neuron: int) -> torch.Tensor:
    """[layer, n_heads]: every earlier head's write along the neuron's input, at the last position."""
    arch = view(model)
    names = [f"attn_head_out.{l}.{h}" for l in range(layer) for h in range(arch.n_heads)]
    out = model(torch.tensor([ids], device=next(model.parameters()).device), capture=names, logits=False)
    w = input_direction(model, layer, neuron).to(out.output.device)
    s = torch.stack([out.acts[n][0, -1].float() @ w for n in names])
    return s.view(layer, arch.n_heads)


def active(scores: torch.Tensor, sigmas: float = ACTIVE_SIGMAS) -> torch.Tensor:
    """Heads above mean + ``sigmas``·std of this prompt's head scores (bool, same shape)."""
    flat = scores.flatten().double()
    return scores > (flat.mean() + sigmas * flat.std()).to(scores.dtype)


def pairs(active_per_prompt: list[torch.Tensor], lo: float = PAIR_RANGE[0], hi: float = PAIR_RANGE[1]
          ) -> list[tuple[int, int, float]]:
    """(layer, head, share of prompts it is active on) for the heads active on lo..hi of them."""
    share = torch.stack(active_per_prompt).float().mean(0)
    return [(l, h, float(share[l, h])) for l, h in torch.nonzero((share >= lo) & (share <= hi)).tolist()]


@torch.no_grad()
def ablation_effects(model, ids: list[int], token_id: int, heads: list[tuple[int, int]]) -> list[float]:
    """For each (layer, head): p(token | prompt) − p(token | prompt, that head's output zeroed), at
    the last position."""
    from ..models.hooks import zero_ablate

    x = torch.tensor([ids], device=next(model.parameters()).device)

    def p(interventions=None) -> float:
        out = model(x, interventions=interventions, logits=False).output
        return float(torch.softmax(logits_at_last(model, out), -1)[0, token_id])

    base = p()
    return [base - p({f"attn_head_out.{l}.{h}": zero_ablate()}) for l, h in heads]

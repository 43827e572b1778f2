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


def padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one right-padded batch and each one's last index: with
    causal attention and positions counted from 0, padding after a prompt changes nothing in it."""
    x = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s)
    return x.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


@torch.no_grad()
def head_scores_batch(model, seqs: list[list[int]], layer: int, neuron: int, chunk: int = 4) -> torch.Tensor:
    """[prompts, layer, n_heads]: :func:`head_scores` of many prompts, ``chunk`` per forward (every
    head's output is captured at every position: memory grows with heads × tokens)."""
    arch = view(model)
    names = [f"attn_head_out.{l}.{h}" for l in range(layer) for h in range(arch.n_heads)]
    dev = next(model.parameters()).device
    w = input_direction(model, layer, neuron).to(dev)
    out = []
    for a in range(0, len(seqs), chunk):
        x, last = padded(seqs[a:a + chunk], dev)
        acts = model(x, capture=names, logits=False).acts
        rows = torch.arange(len(x), device=dev)
        out.append(torch.stack([acts[n][rows, last].float() @ w for n in names], 1))
    return torch.cat(out).view(len(seqs), layer, arch.n_heads).cpu()


def head_scores(model, ids: list[int], layer: int, neuron: int) -> torch.Tensor:
    """[layer, n_heads]: every earlier head's write along the neuron's input, at the last position."""
    return head_scores_batch(model, [ids], layer, neuron)[0]


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
def ablation_effects_batch(model, seqs: list[list[int]], token_id: int, heads: list[tuple[int, int]],
                           chunk: int = 32) -> torch.Tensor:
    """[heads, prompts]: p(token | prompt) − p(token | prompt, that head's output zeroed), at each
    prompt's last position; one batched forward per head and chunk of prompts."""
    from ..models.hooks import zero_ablate

    dev = next(model.parameters()).device
    out = torch.zeros(len(heads), len(seqs))
    for a in range(0, len(seqs), chunk):
        x, last = padded(seqs[a:a + chunk], dev)
        rows = torch.arange(len(x), device=dev)

        def p(interventions=None) -> torch.Tensor:
            h = model(x, interventions=interventions, logits=False).output[rows, last][:, None]
            return torch.softmax(logits_at_last(model, h).float(), -1)[:, token_id].cpu()

        base = p()
        for k, (l, h) in enumerate(heads):
            out[k, a:a + len(x)] = base - p({f"attn_head_out.{l}.{h}": zero_ablate()})
    return out


def ablation_effects(model, ids: list[int], token_id: int, heads: list[tuple[int, int]]) -> list[float]:
    """:func:`ablation_effects_batch` of one prompt."""
    return ablation_effects_batch(model, [ids], token_id, heads)[:, 0].tolist()

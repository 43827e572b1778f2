"""Induction scores of attention heads, measured on their own (the ground truth the look-up sweep
checks its copy-target heads against, issue 15): on a random token sequence repeated twice, an
induction head attends from each token of the second copy to the token that followed that token's
first occurrence. Score = the mean attention weight on that position, over the second copy's
positions and a batch of sequences (1 for a perfect induction head, about 1/position for a
uniform one).

Attention weights come from the model's own attention modules run with the eager implementation
for this pass (the fused kernels do not return weights); the model's setting is put back after.
"""
from __future__ import annotations

import torch

from ..models.arch import view


@torch.no_grad()
def attention_patterns(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> attention weights [batch, heads, query, key] of a whole-model (or any) stage."""
    arch = view(model)
    got: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in range(model.start, model.stop):
        def hook(module, args, out, layer=layer):
            got[layer] = out[1].float()
        hooks.append(arch.attn(layer).register_forward_hook(hook))
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        model(ids.to(next(model.parameters()).device), logits=False)
    finally:
        model.config._attn_implementation = old
        for h in hooks:
            h.remove()
    if any(w is None for w in got.values()):
        raise RuntimeError("this model's attention modules do not return their weights in eager mode")
    return got


def induction_scores(model, seq_len: int = 32, batch: int = 8, seed: int = 0, bos: int | None = None,
                     vocab: tuple[int, int] | None = None) -> torch.Tensor:
    """[layers of the stage, heads]: mean attention from each token of the second copy to the
    token after its first occurrence, on ``batch`` random sequences of ``seq_len`` tokens
    (drawn from ``vocab`` = [low, high), default the whole vocabulary) repeated twice."""
    arch = view(model)
    low, high = vocab or (0, arch.W_U.shape[1] if arch.unembed is not None else model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(low, high, (batch, seq_len), generator=g)
    seq = torch.cat([r, r], 1)
    off = 0
    if bos is not None:
        seq = torch.cat([torch.full((batch, 1), bos), seq], 1)
        off = 1
    pats = attention_patterns(model, seq)
    q = torch.arange(off + seq_len, off + 2 * seq_len - 1)        # second copy, token j (all but the last)
    k = q - seq_len + 1                                             # first copy, token j + 1
    return torch.stack([pats[l][:, :, q, k].mean((0, 2)) for l in sorted(pats)])

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


@torch.no_grad()
def copy_attention(model, docs) -> torch.Tensor:
    """[layers, heads]: on storyworld documents, mean attention from the token before each recalled
    code word to that word's first occurrence (the textbook induction step: "code zib tok ... code
    zib →" attends to "tok"). The same pattern as :func:`induction_scores`, on text the model was
    trained on instead of random sequences."""
    import numpy as np

    got = []
    for d in docs:
        T = min(len(d.tokens), model.config.max_position_embeddings)
        at = [p for p in np.nonzero(d.labels["is_copy_target"][:T])[0] if d.labels["copy_kind"][p] == "code"]
        if not at:
            continue
        pats = attention_patterns(model, torch.tensor([d.token_ids[:T]]))
        P = torch.stack([pats[l][0] for l in sorted(pats)])        # [layers, heads, query, key]
        got += [P[:, :, p - 1, int(d.labels["copy_src"][p])] for p in at]
    if not got:
        raise ValueError("no recalled code words in these documents")
    return torch.stack(got).mean(0)


def head_induction(model, bos: int | None, vocab: tuple[int, int] | None, storyworld_seed: int | None = None,
                   seq_len: int = 32, batch: int = 8, n_docs: int = 64) -> dict:
    """Both induction measurements as lists: ``random`` (repeated random sequences over ``vocab``)
    and, on storyworld, ``docs`` (:func:`copy_attention` over held-out documents)."""
    out = {"random": induction_scores(model, seq_len, batch, bos=bos, vocab=vocab).tolist(), "docs": None}
    if storyworld_seed is not None:
        from ..storyworld.generator import iter_docs

        out["docs"] = copy_attention(model, iter_docs(n_docs, storyworld_seed, "heldout")).tolist()
    return out

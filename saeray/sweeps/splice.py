"""An SAE spliced into a frozen model at one hook point, with the latents edited per batch row:
the one mechanism GradSAE, integrated gradients, exact ablation, masking and steering share.

The model is a whole-model :class:`saeray.models.shard.Stage`; the SAE acts on the positions it was
trained on (``keep``: no BOS, no ``corpus.skip_first`` attention sinks), the others keep their
activations. With ``error_term`` the SAE's error ``x − x̂`` is added back, so an unedited splice
is the unmodified model; without it (GradSAE's choice) the reconstruction alone goes on.

On the residual stream (``resid_post.L``, ``resid_pre.L``) an edited pass starts at the hook point
from the clean pass's hidden state: the layers before it see the same tokens in every row, so
their output is the clean one and is not recomputed (exact, and most of the work for an early
layer's ablations; tests compare it with the full forward). Other hook points run the whole model
with the edit as an intervention.

Only the last position's logits are computed: every output here (the answer's first token at the
answer step, the next greedy token) is read there, and the unembedding of every position would be
most of the work on a large vocabulary.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

OUTPUTS = ("prob", "logprob", "logit_diff")


@dataclass
class Clean:
    """One prompt's unmodified pass: the hook point's activation and the SAE's code at the kept
    positions, the error term, and the unmodified model's last-position logits."""

    ids: Tensor          # [T] token ids
    keep: Tensor         # [T] bool: positions the SAE is spliced at
    act: Tensor          # [K, d] activation at the kept positions
    f: Tensor            # [K, width] latents
    err: Tensor          # [K, d] act − decode(f)
    logits: Tensor       # [V] unmodified model, last position
    hidden: Tensor       # [T, d] the hook point's activation at every position (model dtype)


def _f(x: Tensor) -> Tensor:
    """At least float32 (half-precision models are scored in float32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logits_at_last(model, hidden: Tensor) -> Tensor:
    """Logits [R, V] of the last position of a whole-model stage's final hidden states [R, T, d]."""
    return _f(model.unembed(model.final_norm(hidden[:, -1])))


def encode(sae, x: Tensor) -> Tensor:
    """Latents of ``x`` [..., d] (any leading shape)."""
    return sae.encode(_f(x).reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def decode(sae, f: Tensor) -> Tensor:
    return (f @ sae.W_dec + sae.b_dec) / sae.input_scale


@torch.no_grad()
def clean_pass(model, sae, hookpoint: str, ids: list[int], keep: list[bool]) -> Clean:
    dev = next(model.parameters()).device
    ids_t = torch.tensor(ids, device=dev)
    keep_t = torch.tensor(keep, device=dev, dtype=torch.bool)
    out = model(ids_t[None], capture=[hookpoint], logits=False)
    hidden = out.acts[hookpoint][0]
    act = _f(hidden[keep_t])
    f = encode(sae, act)
    logits = logits_at_last(model, out.output)[0]
    return Clean(ids_t, keep_t, act, f, act - decode(sae, f), logits, hidden)


def resume_layer(hookpoint: str) -> int | None:
    """The first block that reads the hook point's activation, when it is the residual stream."""
    from ..models.hookpoints import parse

    hp = parse(hookpoint)
    return {"resid_post": hp.layer + 1, "resid_pre": hp.layer}.get(hp.kind)


_TAILS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tail(model, start: int):
    """Blocks [start, n) + final norm + unembedding of a whole-model stage, sharing its modules
    (built once per model and start; keyed by the model object itself, never by its id, which a
    new model may reuse once the old one is gone)."""
    from ..models.shard import Stage

    tails = _TAILS.setdefault(model, {})
    if start not in tails:
        tails[start] = Stage(model.config, model.family, (start, model.stop),
                             [model.blocks[i] for i in range(start, model.stop)],
                             rotary=model.rotary, final_norm=model.final_norm, unembed=model.unembed)
    return tails[start]


def last_logits(model, hookpoint: str, ids: Tensor, keep: Tensor, new_kept: Tensor | Callable,
                hidden: Tensor | None = None) -> Tensor:
    """Logits [R, V] at the last position of ``ids`` [R, T] with the hook point's kept positions
    replaced by ``new_kept`` [R, K, d] (or by ``new_kept(act_kept)`` when it is a function).
    ``hidden``: the clean activation [T, d] at the hook point; with it, a residual-stream hook
    point resumes there instead of re-running the layers before it."""
    start = resume_layer(hookpoint) if hidden is not None and not callable(new_kept) else None
    if start is not None:
        h = hidden[None].expand(ids.shape[0], -1, -1).clone()
        h[:, keep] = new_kept.to(h.dtype)
        if start < model.stop:
            h = _tail(model, start)(h, logits=False, detach=False).output
        return logits_at_last(model, h)

    def put(act: Tensor) -> Tensor:
        new = new_kept(_f(act[:, keep])) if callable(new_kept) else new_kept
        out = act.clone()
        out[:, keep] = new.to(act.dtype)
        return out

    out = model(ids, interventions={hookpoint: put}, logits=False, detach=False)
    return logits_at_last(model, out.output)


def output_of(logits: Tensor, answer: int, kind: str = "prob") -> Tensor:
    """The scalar per row that scores and effects are measured on: the probability of the answer's
    first token (GradSAE's choice), its log-probability, or its logit minus the largest other logit."""
    if kind == "prob":
        return torch.softmax(logits, -1)[..., answer]
    if kind == "logprob":
        return torch.log_softmax(logits, -1)[..., answer]
    if kind == "logit_diff":
        other = logits.clone()
        other[..., answer] = float("-inf")
        return logits[..., answer] - other.max(-1).values
    raise ValueError(f"unknown output {kind!r}; use one of {', '.join(OUTPUTS)}")

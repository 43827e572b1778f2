"""An SAE spliced into a frozen model at one hook point, with the latents edited per batch row:
the one mechanism GradSAE, integrated gradients, exact ablation, masking and steering share.

The model is a whole-model :class:`saeray.models.shard.Stage`; the SAE acts on the positions it was
trained on (``keep``: no BOS, no ``corpus.skip_first`` attention sinks), the others keep their
activations. With ``error_term`` the SAE's error ``x − x̂`` is added back, so an unedited splice
is the unmodified model; without it (GradSAE's choice) the reconstruction alone goes on.

Only the last position's logits are computed: every output here (the answer's first token at the
answer step, the next greedy token) is read there, and the unembedding of every position would be
most of the work on a large vocabulary.
"""
from __future__ import annotations

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


def encode(sae, x: Tensor) -> Tensor:
    """Latents of ``x`` [..., d] (any leading shape)."""
    return sae.encode(x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:-1], -1)


def decode(sae, f: Tensor) -> Tensor:
    return (f @ sae.W_dec + sae.b_dec) / sae.input_scale


@torch.no_grad()
def clean_pass(model, sae, hookpoint: str, ids: list[int], keep: list[bool]) -> Clean:
    dev = next(model.parameters()).device
    ids_t = torch.tensor(ids, device=dev)
    keep_t = torch.tensor(keep, device=dev, dtype=torch.bool)
    out = model(ids_t[None], capture=[hookpoint], logits=False)
    act = out.acts[hookpoint][0, keep_t].float()
    f = encode(sae, act)
    logits = model.unembed(model.final_norm(out.output[:, -1]))[0].float()
    return Clean(ids_t, keep_t, act, f, act - decode(sae, f), logits)


def last_logits(model, hookpoint: str, ids: Tensor, keep: Tensor, new_kept: Tensor | Callable) -> Tensor:
    """Logits [R, V] at the last position of ``ids`` [R, T] with the hook point's kept positions
    replaced by ``new_kept`` [R, K, d] (or by ``new_kept(act_kept)`` when it is a function)."""
    def put(act: Tensor) -> Tensor:
        new = new_kept(act[:, keep].float()) if callable(new_kept) else new_kept
        out = act.clone()
        out[:, keep] = new.to(act.dtype)
        return out

    out = model(ids, interventions={hookpoint: put}, logits=False, detach=False)
    return model.unembed(model.final_norm(out.output[:, -1])).float()


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

"""The paper's perturbation experiments (methods.md §3.2-3.3; wave2.md §1.1): choose the top-K or
bottom-K latents by a score, edit them during greedy decoding, and read the answer.

* **Masking**: the chosen latents are zeroed at every position (generated ones included) with the
  SAE spliced in (error term dropped by default, as the paper's code does; ``gradsae.error_term``
  keeps it, for an SAE whose reconstruction alone already loses the answer); the answer is
  decoded greedily.
  Lower exact match after masking the top-K means the score found influential latents; masking the
  bottom-K should leave it near 100 %.
* **Steering**, as the *released code* does it (not as the paper's text describes): at the last
  position only, zero the prompt's top-K (or bottom-K) latents and write the partner prompt's
  top-K latents with the partner's stored scores clamped to [0, 50]; success = the partner's answer.

Selection (paper eqs. 4-5): candidates are latents with a positive score; top-K are the K largest,
bottom-K the K smallest positive ones. ``"50%"`` is half the latents active at the last prompt
position. The released code fills a top-K with zero-score latents when fewer than K score above
zero; here a set is never larger than the candidates.

Every edited variant of a prompt is one row of one batch; decoding re-runs the whole sequence each
step (no KV cache), as the released code does, so edits apply to every position it sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .splice import decode, encode, last_logits

STEER_CLAMP = (0.0, 50.0)


def k_value(k: int | str, n_active_last: int) -> int:
    if isinstance(k, str):          # "50%"
        return max(1, int(n_active_last * float(k.rstrip("%")) / 100))
    return int(k)


def choose(score: Tensor, k: int, side: str) -> Tensor:
    """Latent indices: the ``k`` largest (``top``) or smallest (``bottom``) positive scores."""
    cand = torch.nonzero(score > 0).flatten()
    order = torch.argsort(score[cand], descending=(side == "top"), stable=True)
    return cand[order[:k]]


@dataclass
class Edit:
    """One decoding row: latents zeroed everywhere, zeroed at the last position, written at the last position."""

    zero_all: Tensor | None = None
    zero_last: Tensor | None = None
    inject_idx: Tensor | None = None
    inject_val: Tensor | None = None


@torch.no_grad()
def decode_greedy(model, sae, hookpoint: str, ids: list[int], keep: list[bool], edits: list[Edit], steps: int,
                  error_term: bool = False) -> Tensor:
    """Greedy continuation [R, steps] of ``ids`` with the SAE spliced in and row r's latents edited
    by ``edits[r]`` at every step."""
    dev = next(model.parameters()).device
    R, width = len(edits), sae.W_dec.shape[0]
    zero_all = torch.ones(R, width, device=dev)
    zero_last = torch.ones(R, width, device=dev)
    put_mask = torch.zeros(R, width, dtype=torch.bool, device=dev)
    put_val = torch.zeros(R, width, device=dev)
    for r, e in enumerate(edits):
        if e.zero_all is not None:
            zero_all[r, e.zero_all] = 0
        if e.zero_last is not None:
            zero_last[r, e.zero_last] = 0
        if e.inject_idx is not None:
            put_mask[r, e.inject_idx] = True
            put_val[r, e.inject_idx] = e.inject_val.to(dev).float()
    seq = torch.tensor(ids, device=dev)[None].expand(R, -1)
    keep_t = torch.tensor(keep, device=dev, dtype=torch.bool)
    out = []

    def edit(act: Tensor) -> Tensor:     # act [R, K, d]
        f0 = encode(sae, act)
        f = f0 * zero_all[:, None]
        last = f[:, -1] * zero_last
        f = torch.cat([f[:, :-1], torch.where(put_mask, put_val, last)[:, None]], 1)
        new = decode(sae, f)
        return new + (act - decode(sae, f0)) if error_term else new

    for _ in range(steps):
        nxt = last_logits(model, hookpoint, seq, keep_t, edit).argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        keep_t = torch.cat([keep_t, keep_t.new_ones(1)])
    return torch.stack(out, 1) if out else seq.new_zeros(R, 0)


def masking_rows(scores: dict[str, Tensor], ks: list, n_active_last: int, methods=("gradsae", "activation")):
    """(labels, edits) for the masking experiment, the unedited splice first."""
    labels, edits = [{"method": "none", "side": "none", "k": "0", "k_n": 0}], [Edit()]
    for m in methods:
        for side in ("top", "bottom"):
            for k in ks:
                idx = choose(scores[m], k_value(k, n_active_last), side)
                labels.append({"method": m, "side": side, "k": str(k), "k_n": int(len(idx))})
                edits.append(Edit(zero_all=idx))
    return labels, edits


def steering_rows(scores: dict[str, Tensor], partner: dict[str, Tensor], ks: list, n_active_last: int,
                  methods=("gradsae", "activation")):
    """(labels, edits) for the released code's local steering."""
    labels, edits = [], []
    for m in methods:
        for side in ("top", "bottom"):
            for k in ks:
                kk = k_value(k, n_active_last)
                own = choose(scores[m], kk, side)
                theirs = choose(partner[m], kk, side)
                val = partner[m][theirs].clamp(*STEER_CLAMP)
                labels.append({"method": m, "side": side, "k": str(k), "k_n": int(len(own))})
                edits.append(Edit(zero_last=own, inject_idx=theirs, inject_val=val))
    return labels, edits

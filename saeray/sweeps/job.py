"""What one sweep work item computes on a model-pool worker, for one hook point, one SAE and a
shard of prompts: a plain function (:func:`run_prompt`) over a whole-model stage, testable without
Ray, and the pool job around it.

Per prompt: greedy decoding of the unmodified model (is the answer right? the paper keeps only
those prompts), the clean pass, then whichever experiments the sweep asks for: ``agreement``
(GradSAE, integrated gradients and the activation baseline against exact ablation of every active
latent), ``masking`` and ``steering`` (:mod:`.masking`). The sweep job is a *direct* pool job: its
work is many dependent forward and backward passes, so the whole model sits in one actor and the
job drives it (see :class:`saeray.models.pool.PoolWorker`).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..models.pool import DirectJob
from .ablation import exact_effects
from .agreement import agreement
from .gradsae import GradOptions, integrated, scores
from .masking import decode_greedy, masking_rows, steering_rows
from .splice import clean_pass, logits_at_last

SCORES = ("gradsae", "signed", "ig", "ig_signed", "activation")


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    """The unmodified model's greedy continuation (no KV cache: steps are few)."""
    seq = torch.tensor(ids, device=next(model.parameters()).device)[None]
    out = []
    for _ in range(steps):
        nxt = logits_at_last(model, model(seq, logits=False).output).argmax(-1)
        out.append(int(nxt))
        seq = torch.cat([seq, nxt[:, None]], 1)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def run_prompt(model, sae, hookpoint: str, p: dict, partner: dict | None, experiments: list[str], ks: list,
               opt: GradOptions, exact_batch: int = 32, topk: int = 10) -> dict:
    """Everything one prompt contributes to a sweep (plain numbers and lists, picklable)."""
    answer = p["answer_ids"][0]
    pred = greedy(model, p["ids"], len(p["answer_ids"]))
    res: dict = {"id": p["id"], "pred": pred, "correct": pred == list(p["answer_ids"]), "n_tokens": len(p["ids"])}
    if not res["correct"]:
        return res
    clean = clean_pass(model, sae, hookpoint, p["ids"], p["keep"])
    active = torch.nonzero((clean.f > 0).any(0)).flatten()
    n_last = int((clean.f[-1] > 0).sum())
    y_model = float(torch.softmax(clean.logits, -1)[answer])
    t0 = time.perf_counter()
    sc = scores(model, sae, hookpoint, clean, answer, replace(opt, ig_steps=0))
    t1 = time.perf_counter()
    res.update(n_active=int(len(active)), n_active_last=n_last, p_model=y_model, y_splice=float(sc["y"]),
               t_gradsae_s=t1 - t0)
    if opt.ig_steps:
        sc.update(integrated(model, sae, hookpoint, clean, answer, opt))
        res["t_ig_s"] = time.perf_counter() - t1
    if "agreement" in experiments:
        t2 = time.perf_counter()
        y0, eff = exact_effects(model, sae, hookpoint, clean, active, answer, opt.output, opt.error_term, exact_batch)
        res["t_exact_s"] = time.perf_counter() - t2
        res["y_base"] = y0
        lat = {"latent": _np(active).astype(np.int32), "act_last": _np(clean.f[-1, active]), "exact": _np(eff)}
        lat.update({k: _np(sc[k][active]) for k in SCORES if k in sc})
        res["latents"] = lat
        res["agreement"] = {k: agreement(lat[k], lat["exact"], topk) for k in SCORES if k in lat}
    if "masking" in experiments:
        labels, edits = masking_rows(sc, ks, n_last)
        toks = decode_greedy(model, sae, hookpoint, p["ids"], p["keep"], edits, len(p["answer_ids"]), opt.error_term)
        res["masking"] = [{**lab, "tokens": t} for lab, t in zip(labels, toks.tolist())]
    if "steering" in experiments and partner is not None:
        pc = clean_pass(model, sae, hookpoint, partner["ids"], partner["keep"])
        psc = scores(model, sae, hookpoint, pc, partner["answer_ids"][0], replace(opt, ig_steps=0))
        labels, edits = steering_rows(sc, psc, ks, n_last)
        toks = decode_greedy(model, sae, hookpoint, p["ids"], p["keep"], edits, len(partner["answer_ids"]),
                             opt.error_term)
        res["steering"] = [{**lab, "tokens": t} for lab, t in zip(labels, toks.tolist())]
    return res


class SweepJob(DirectJob):
    """The pool job: holds the SAEs of its sweep, loaded on first use."""

    grad = True

    def __init__(self, stage, device: torch.device, saes: dict[str, dict[str, str]]):
        if not (stage.is_first and stage.is_last):
            raise ValueError("a sweep needs the whole model in one actor (one pipeline stage)")
        self.model, self.device, self.paths = stage, device, saes
        self._saes: dict[tuple[str, str], object] = {}

    def sae(self, hp: str, name: str):
        if (hp, name) not in self._saes:
            from ..sae import io

            self._saes[(hp, name)] = io.load(self.paths[hp][name], device=str(self.device)).eval()
        return self._saes[(hp, name)]

    def run(self, payload: dict) -> int:
        sae = self.sae(payload["hookpoint"], payload["sae"])
        opt = GradOptions(**payload["options"])
        for p in payload["prompts"]:
            partner = payload["partners"].get(p["partner"])
            self.out.append(run_prompt(self.model, sae, payload["hookpoint"], p, partner, payload["experiments"],
                                       payload["ks"], opt, payload["exact_batch"], payload["topk"]))
        return len(self.out)

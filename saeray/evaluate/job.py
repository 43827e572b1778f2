"""The evaluation job: what a model-pool worker does during evaluation. It holds the trained SAEs
of its stage's hook points; each pool item is one held-out batch, pushed through the pipeline once
per *mode* (the payload's ``mode``):

* ``("clean",)``: no intervention. Stages capture their hook points and score every SAE on the
  clean activations (FVU, L0, firing counts, concept counts); the last stage keeps the clean
  log-probabilities of the batch for KL;
* ``("zero", hp)``: hook point ``hp`` zero-ablated (the reference of CE loss recovered);
* ``("sae", hp, name)``: ``hp`` replaced by SAE ``name``'s reconstruction;
* ``("values",)``: a second clean pass for concept AUROC (pass 2 of :mod:`.concepts`); the payload
  carries the latent chosen per concept in pass 1.

An intervention at layer L leaves everything before block L as in the clean pass, so the clean
pass keeps the hidden states entering each hook point's block (``resid_pre.L``) and the intervention
passes start there (``resume``): stages before L send nothing, the stage holding L runs from block L
on. On a deep model with hook points spread over its depth this skips about half the block
computations of evaluation (docs/benchmarks.md, ``saeray bench evaluate``); the CE and KL figures
are those of full passes (tests/test_evaluate_resume.py). The kept states cost one
[batch, pos, d_model] tensor per hook-point layer of the stage, per worker, for one item at a time.

Everything is accumulated per item and returned by ``finish``; the driver sums items, so an item
re-run after an actor restart counts exactly once (its clean pass comes first again, and keeps the
states anew). A plain object (see :mod:`saeray.models.pool`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..sae.metrics import RunningMetrics
from .concepts import ConceptScorer


class EvalJob:
    logits = True
    grad = False

    def __init__(self, stage, device: torch.device, saes: dict[str, dict[str, str]], n_concepts: int,
                 resume: bool = True):
        from ..models.hookpoints import parse
        from ..sae import io

        self.device = device
        self.is_last = stage.is_last
        self.layers = stage.layer_range
        self.saes = {hp: {n: io.load(url, device=str(device)) for n, url in d.items()} for hp, d in saes.items()}
        self.hookpoints = list(self.saes)
        self.n_concepts = n_concepts
        # resume=False runs every intervention pass through the whole model (the bench's "before")
        self.do_resume = bool(resume)
        self.kept_layers = sorted({parse(hp).layer for hp in self.hookpoints}) if resume else []

    def begin(self, item: str) -> None:
        self.metrics = {hp: {n: RunningMetrics(s.width) for n, s in d.items()} for hp, d in self.saes.items()}
        self.counts = {hp: {n: ConceptScorer(s.width, self.n_concepts) for n, s in d.items()}
                       for hp, d in self.saes.items()} if self.n_concepts else {}
        self.values: dict[str, dict[str, list]] = {}
        self.losses: dict[tuple, list[float]] = {}
        self._clean_logp: torch.Tensor | None = None
        self._kept: dict[int, torch.Tensor] = {}

    def capture(self, payload: dict) -> list[str]:
        mode = payload["mode"][0]
        if mode == "clean":
            return list(dict.fromkeys(self.hookpoints + [f"resid_pre.{L}" for L in self.kept_layers]))
        return self.hookpoints if mode == "values" else []

    def resume(self, payload: dict):
        """Where an intervention pass starts (the pool's ``Job.resume``): at its hook point's block,
        from the hidden states the clean pass of this item kept."""
        from ..models.hookpoints import parse
        from ..models.pool import UNCHANGED

        mode = payload["mode"]
        if not self.do_resume or mode[0] not in ("zero", "sae"):
            return None
        L = parse(mode[1]).layer
        start, stop = self.layers
        if L >= stop:
            return UNCHANGED
        if L < start:
            return None
        if L not in self._kept:
            raise RuntimeError(f"no clean pass kept the input of layer {L}: the clean pass of a batch must "
                               "come before its interventions")
        return L, self._kept[L].clone()

    def interventions(self, payload: dict):
        """Zero-ablation and splicing act on the kept positions only (the rows the SAE was trained
        on): BOS, skipped attention-sink positions and padding keep their clean activations, so CE
        loss recovered measures reconstruction where the SAE is meant to be used."""
        mode = payload["mode"]
        if mode[0] not in ("zero", "sae") or mode[1] not in self.saes:
            return None
        keep = torch.from_numpy(np.array(payload["keep"])).to(self.device)
        if mode[0] == "zero":
            from ..models.hooks import zero_ablate

            return {mode[1]: zero_ablate(keep)}
        sae = self.saes[mode[1]][mode[2]]

        def splice(act: torch.Tensor) -> torch.Tensor:
            out = act.clone()
            out[keep] = sae(act[keep].float()).recon.to(act.dtype)
            return out
        return {mode[1]: splice}

    def on_acts(self, payload: dict, acts: dict[str, torch.Tensor]) -> None:
        mode = payload["mode"][0]
        if mode not in ("clean", "values") or not acts:
            return
        if mode == "clean":
            # copies here and in resume (cheap next to a block): no block may write into a kept state
            self._kept = {L: acts[f"resid_pre.{L}"].clone() for L in self.kept_layers}
        keep_t = torch.from_numpy(np.array(payload["keep"])).to(self.device)
        y = payload.get("y")
        y = torch.from_numpy(np.array(y)) if y is not None and self.n_concepts else None
        for hp in self.hookpoints:
            x = acts[hp][keep_t].float()
            for name, sae in self.saes[hp].items():
                res = sae(x)
                if mode == "clean":
                    self.metrics[hp][name].add(x, res.recon, res.latents)
                    if y is not None:
                        self.counts[hp][name].add_counts(res.latents.cpu(), y)
                elif y is not None:
                    best = payload["best"][hp][name]
                    v = self.values.setdefault(hp, {}).setdefault(name, [[], []])
                    v[0].append(res.latents[:, best].float().cpu())
                    v[1].append(y)

    def on_output(self, payload: dict, logits: torch.Tensor) -> None:
        mode = tuple(payload["mode"])
        ids_t = torch.from_numpy(np.array(payload["ids"])).to(logits.device)
        # target t+1 counts when it is a real token: keep marks every real token after BOS
        valid = torch.from_numpy(np.array(payload["keep"])[:, 1:]).to(logits.device)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids_t[:, 1:].unsqueeze(-1)).squeeze(-1)[valid]
        kl = 0.0
        if mode[0] == "clean":
            self._clean_logp = logp[valid]
        elif mode[0] in ("zero", "sae"):
            assert self._clean_logp is not None, "the clean pass of a batch must come before its interventions"
            lp, clean = logp[valid], self._clean_logp
            kl = float((clean.exp() * (clean - lp)).sum(-1).double().sum())
        if mode[0] != "values":
            self.losses[mode] = [float(nll.double().sum()), int(valid.sum()), kl]

    def finish(self, item: str) -> dict:
        values = {hp: {n: (torch.cat(v[0]), torch.cat(v[1])) for n, v in d.items()} for hp, d in self.values.items()}
        return {"losses": self.losses, "metrics": self.metrics, "counts": self.counts, "values": values}


def add_losses(sums: dict[tuple, list], losses: dict) -> None:
    """Add one item's ``losses`` (mode -> [nll sum, tokens, KL sum], from :meth:`EvalJob.finish`)
    into ``sums``."""
    for mode, v in losses.items():
        s = sums.setdefault(tuple(mode), [0.0, 0, 0.0])
        for i in range(3):
            s[i] += v[i]

"""An evaluation stage: one contiguous layer range of the frozen model (the same sharding as the
harvest) plus the trained SAEs of the hook points in those layers. A plain object; the Ray actor
around it is :func:`make_actor_class`.

For every held-out batch the driver pushes the batch through the pipeline once per *mode*:

* ``("clean",)``: no intervention. Stages capture their hook points and score every SAE on the
  clean activations (FVU, L0, firing counts, concept counts); the last stage keeps the clean
  log-probabilities of this batch for KL;
* ``("zero", hp)``: hook point ``hp`` zero-ablated (the reference of CE loss recovered);
* ``("sae", hp, name)``: ``hp`` replaced by SAE ``name``'s reconstruction;
* ``("values",)``: a second clean pass for concept AUROC (pass 2 of :mod:`.concepts`).

The last stage returns the summed next-token loss, token count and summed KL(clean || mode).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..sae.metrics import RunningMetrics
from .concepts import ConceptScorer


class EvalWorker:
    def __init__(self, model_path: str, revision: str | None, layer_range: tuple[int, int],
                 saes: dict[str, dict[str, str]], n_concepts: int, dtype: str = "float32", device: str = "cpu",
                 trust_remote_code: bool = False, threads: int | None = None):
        from ..models.shard import Stage
        from ..sae import io

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.stage = Stage.from_pretrained(model_path, tuple(layer_range), revision=revision, dtype=dtype,
                                           device=device, trust_remote_code=trust_remote_code)
        self.saes = {hp: {n: io.load(url, device=device) for n, url in d.items()} for hp, d in saes.items()}
        self.hookpoints = list(self.saes)
        self.stats = {hp: {n: _SAEStats(s.width, n_concepts) for n, s in d.items()} for hp, d in self.saes.items()}
        self.n_concepts = n_concepts
        self._clean_logp: tuple[int, torch.Tensor] | None = None

    def pid(self) -> int:
        return os.getpid()

    def _intervention(self, mode: tuple):
        if mode[0] == "zero" and mode[1] in self.saes:
            from ..models.hooks import zero_ablate

            return {mode[1]: zero_ablate()}
        if mode[0] == "sae" and mode[1] in self.saes:
            sae = self.saes[mode[1]][mode[2]]

            def splice(act: torch.Tensor) -> torch.Tensor:
                shape = act.shape
                return sae(act.reshape(-1, shape[-1]).float()).recon.reshape(shape).to(act.dtype)
            return {mode[1]: splice}
        return None

    @torch.inference_mode()
    def forward(self, batch: int, mode: tuple, x, keep: np.ndarray, concepts: np.ndarray | None = None,
                ids: np.ndarray | None = None):
        inputs = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x).to(self.device)
        capture = self.hookpoints if mode[0] in ("clean", "values") else []
        out = self.stage(inputs, capture=capture, interventions=self._intervention(mode), logits=True)
        if capture:
            keep_t = torch.from_numpy(np.array(keep)).to(self.device)
            y = torch.from_numpy(np.array(concepts)) if concepts is not None and self.n_concepts else None
            for hp in self.hookpoints:
                acts = out.acts[hp][keep_t].float()
                for name, sae in self.saes[hp].items():
                    res = sae(acts)
                    st = self.stats[hp][name]
                    if mode[0] == "clean":
                        st.add(acts, res.recon, res.latents, y)
                    elif y is not None:
                        st.concepts.add_values(res.latents.cpu(), y)
        if not self.stage.is_last:
            return out.output.to("cpu")
        return self._loss(batch, mode, out.output, ids, keep)

    def _loss(self, batch: int, mode: tuple, logits: torch.Tensor, ids: np.ndarray, keep: np.ndarray) -> dict:
        ids_t = torch.from_numpy(np.array(ids)).to(logits.device)
        # target t+1 counts when it is a real token: keep marks every real token after BOS
        valid = torch.from_numpy(np.array(keep)[:, 1:]).to(logits.device)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = ids_t[:, 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[valid]
        out = {"loss_sum": float(nll.double().sum()), "n": int(valid.sum())}
        if mode[0] == "clean":
            self._clean_logp = (batch, logp[valid])
            out["kl_sum"] = 0.0
        elif mode[0] in ("zero", "sae"):
            b, clean = self._clean_logp
            assert b == batch, "the clean pass of a batch must come before its interventions"
            lp = logp[valid]
            out["kl_sum"] = float((clean.exp() * (clean - lp)).sum(-1).double().sum())
        return out

    def choose_concepts(self) -> None:
        for d in self.stats.values():
            for st in d.values():
                st.concepts.choose()

    def results(self, names: list[str]) -> dict:
        return {hp: {n: st.result(names) for n, st in d.items()} for hp, d in self.stats.items()}


class _SAEStats:
    def __init__(self, width: int, n_concepts: int):
        self.metrics = RunningMetrics(width)
        self.concepts = ConceptScorer(width, n_concepts)

    def add(self, x: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor, y: torch.Tensor | None) -> None:
        self.metrics.add(x, recon, latents)
        if y is not None:
            self.concepts.add_counts(latents.cpu(), y)

    def result(self, names: list[str]) -> dict:
        m = self.metrics.result()
        out = {k: m[k] for k in ("tokens", "fvu", "mse", "l0", "dead_frac", "dense_frac")}
        if names and self.concepts.values:
            out.update(self.concepts.result(names))
        return out


def make_actor_class():
    import ray

    return ray.remote(max_restarts=1, max_task_retries=0)(EvalWorker)

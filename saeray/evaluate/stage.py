"""The evaluate stage: every SAE of a target measured inside its model on held-out tokens.

CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean), with L the mean next-token loss over
held-out tokens when the hook point is zero-ablated (L_zero), replaced by the SAE's reconstruction
(L_sae) or left alone (L_clean); KL is the mean per-token KL(clean ‖ spliced). FVU, L0, dead and
dense fractions come from the same held-out activations; on storyworld runs, the planted concepts
are scored per SAE (:mod:`.concepts`).

Runs on the model pool with the harvest's layer split: ``evaluation.pipelines`` replicas take
held-out batches side by side; each batch is one pool item (every mode of it, see
:mod:`.job`). The held-out contexts come from the same tokenized corpus as the harvest.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, SaerayError
from ..progress import progress
from ..run.stages import Result, Stage, TargetContext
from .concepts import storyworld_concepts

log = logging.getLogger("saeray")


@dataclass
class EvalResult(Result):
    loss_clean: float
    heldout_tokens: int
    n_concepts: int
    saes: dict = field(default_factory=dict)      # hookpoint -> variant -> metrics (no per-concept detail)
    detail: str = "eval.json"                       # per-concept detail, in the target's folder



def key(spec, target) -> dict:
    from ..train.stage import key as train_key

    e = spec.evaluation
    return {**train_key(spec, target), "evaluation.ce_loss": e.ce_loss, "evaluation.concepts": e.concepts,
            "corpus.heldout_docs": spec.corpus.heldout_docs}


def check(spec, targets) -> None:
    from ..harvest.corpus import corpus_for

    if spec.corpus.heldout_docs == 0:
        raise InputError("corpus.heldout_docs: 0 held-out documents, but the evaluate stage needs some; "
                         "set corpus.heldout_docs (e.g. 256)")
    for t in targets:
        corpus_for(spec.corpus, t.ref.tokenizer()).check(need_heldout=True)


def run(ctx: TargetContext, inputs: dict) -> EvalResult:
    from ..harvest.corpus import corpus_for
    from ..harvest.stage import plan
    from ..models.pool import Item, Load, ModelPool
    from ..models.shard import route
    from .job import EvalJob, add_losses

    spec, target = ctx.spec, ctx.target
    trained = inputs["train"]
    paths = {hp: {n: ctx.store.url_of(r["path"]) for n, r in d.items()} for hp, d in trained.saes.items()}
    if not paths:
        raise SaerayError(f"nothing to evaluate for {target}: no trained SAEs")
    p = plan(spec, target)
    hps = [hp for hp in p.hookpoints if hp in paths]
    corpus = corpus_for(spec.corpus, target.ref.tokenizer())
    c = corpus.heldout()
    names: list[str] = []
    Y = None
    if spec.evaluation.concepts and corpus.is_storyworld:
        names, Y = storyworld_concepts(c, spec.corpus.seed)
        log.info(f"evaluate {target}: {len(names)} planted concepts with enough held-out positives")
    row_off = np.concatenate([[0], np.cumsum(c.keep.sum(1))])
    modes: list[tuple] = [("clean",)]
    if spec.evaluation.ce_loss:
        for hp in hps:
            modes.append(("zero", hp))
            modes += [("sae", hp, n) for n in paths[hp]]
    B = spec.evaluation.batch_size
    slices = [slice(a, min(a + B, len(c))) for a in range(0, len(c), B)]

    def batches(sl: slice, mode_list: list[tuple], best=None):
        y = Y[row_off[sl.start]:row_off[sl.stop]] if Y is not None else None
        for mode in mode_list:
            payload = {"mode": mode, "keep": c.keep[sl], "ids": c.ids[sl], "y": y}
            if best is not None:
                payload["best"] = best
            yield c.ids[sl], payload, mode

    sums: dict[tuple, list[float]] = {}
    metrics: dict[str, dict] = {}
    scorers: dict[str, dict] = {}

    def on_item(_key: str, parts: list[dict]) -> None:
        for part in parts:
            add_losses(sums, part["losses"])
            for hp, d in part["metrics"].items():
                for n, m in d.items():
                    metrics.setdefault(hp, {})[n] = metrics[hp][n].merge(m) if n in metrics.get(hp, {}) else m
            for hp, d in part["counts"].items():
                for n, sc in d.items():
                    have = scorers.setdefault(hp, {})
                    have[n] = have[n].merge_counts(sc) if n in have else sc

    def on_values(_key: str, parts: list[dict]) -> None:
        for part in parts:
            for hp, d in part["values"].items():
                for n, (v, y) in d.items():
                    scorers[hp][n].values.append(v)
                    scorers[hp][n].labels.append(y)

    per_stage = route(hps, p.ranges, p.n_layers, p.n_heads)
    job_args = [{"saes": {hp: paths[hp] for hp in st}, "n_concepts": len(names)} for st in per_stage]
    res = spec.resources.eval
    with ModelPool(Load.of(target.ref, res), p.ranges, EvalJob, job_args, replicas=spec.evaluation.pipelines,
                   resources=res.ray_options(), name=f"evaluate {target}") as pool:
        with progress(f"evaluate {target}", total=len(slices) * len(modes), unit="pass") as bar:
            pool.run([Item(f"b{i:05d}", lambda sl=sl: batches(sl, modes)) for i, sl in enumerate(slices)], on_item,
                     lambda _tag: bar.advance(1))
        if names:
            for d in scorers.values():
                for sc in d.values():
                    sc.choose()
            best = {hp: {n: sc.best for n, sc in d.items()} for hp, d in scorers.items()}
            pool.run([Item(f"v{i:05d}", lambda sl=sl: batches(sl, [("values",)], best))
                      for i, sl in enumerate(slices)], on_values)

    def mean(mode):
        s = sums[mode]
        return s[0] / max(s[1], 1), s[2] / max(s[1], 1)

    l_clean, _ = mean(("clean",))
    out: dict[str, dict] = {}
    for hp in hps:
        for n in paths[hp]:
            m = metrics[hp][n].result()
            r = {k: m[k] for k in ("tokens", "fvu", "mse", "l0", "dead_frac", "dense_frac")}
            if names:
                r.update(scorers[hp][n].result(names))
            r["path"] = trained.saes[hp][n]["path"]
            r["loss_clean"] = l_clean
            if spec.evaluation.ce_loss:
                l_zero, _ = mean(("zero", hp))
                l_sae, kl = mean(("sae", hp, n))
                denom = l_zero - l_clean
                r.update(loss_zero=l_zero, loss_sae=l_sae, kl=kl,
                         ce_loss_recovered=(l_zero - l_sae) / denom if abs(denom) > 1e-9 else math.nan)
            out.setdefault(hp, {})[n] = r
    heldout_tokens = int(c.keep.sum())
    ctx.store.write_json("eval.json", {"model": target.model, "revision": target.revision,
                                       "heldout_contexts": len(c), "heldout_tokens": heldout_tokens,
                                       "concept_names": names, "loss_clean": l_clean, "saes": out})
    light = {hp: {n: {k: v for k, v in r.items() if k != "concepts"} for n, r in d.items()} for hp, d in out.items()}
    log.info(f"evaluate {target}: {sum(len(d) for d in out.values())} SAEs on {heldout_tokens} held-out tokens; "
             f"clean loss {l_clean:.3f}")
    return EvalResult(l_clean, heldout_tokens, len(names), light)


STAGE = Stage("evaluate", needs=("train",), key=key, check=check, run=run, result=EvalResult)

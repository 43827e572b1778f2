"""The ``evaluate`` stage: every trained SAE measured inside the model on held-out tokens.

CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean), with L the mean next-token loss over
held-out tokens when the hook point is zero-ablated (L_zero), replaced by the SAE's reconstruction
(L_sae) or left alone (L_clean); KL is the mean per-token KL(clean ‖ spliced). FVU, L0, dead and
dense fractions come from the same held-out activations; on storyworld runs, the planted concepts
are scored per SAE (:mod:`.concepts`).

Hook points are spread over ``evaluation.pipelines`` pipelines of model-shard actors (the
harvest's layer split), which run side by side; each pipeline sees every held-out batch once per
mode (clean, zero-ablate per hook point, splice per SAE).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from ..errors import SaerayError
from ..harvest.corpus import Corpus
from ..progress import progress
from .concepts import storyworld_concepts

log = logging.getLogger("saeray")


def _groups(hps: list[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(hps)))
    return [hps[i::n] for i in range(n)]


def run_evaluate(spec, run, manifest) -> dict:
    import ray

    from ..harvest.run import plan
    from ..models.shard import route
    from ..train.launch import sae_paths
    from .worker import make_actor_class

    paths = sae_paths(run, manifest)
    if not paths:
        raise SaerayError("nothing to evaluate: the run has no trained SAEs (run the train stage first)")
    p = plan(spec, spec.model.revisions[0])
    hps = [hp for hp in p.hookpoints if hp in paths]
    tok = p.ref.tokenizer()
    corpus = Corpus(spec.corpus, tok)
    ctx = corpus.heldout()
    if len(ctx) == 0:
        raise SaerayError("corpus.heldout_docs is 0: evaluation needs held-out documents")
    names: list[str] = []
    Y = None
    if spec.evaluation.concepts and corpus.is_storyworld:
        names, Y = storyworld_concepts(ctx, spec.corpus.seed)
        log.info(f"evaluate: {len(names)} planted concepts with enough held-out positives")
    row_off = np.concatenate([[0], np.cumsum(ctx.keep.sum(1))])
    res = spec.resources.eval
    opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    device = "cuda" if res.num_gpus > 0 else "cpu"
    Actor = make_actor_class()
    pipes = []
    for group in _groups(hps, spec.evaluation.pipelines):
        per_stage = route(group, p.ranges, p.n_layers, p.n_heads)
        actors = [Actor.options(**opts).remote(p.ref.path, p.ref.revision, r,
                                               {hp: paths[hp] for hp in st_hps}, len(names), spec.model.dtype,
                                               device, p.ref.trust_remote_code, max(1, int(res.num_cpus)))
                  for r, st_hps in zip(p.ranges, per_stage)]
        pipes.append((group, actors))

    modes_of = {}
    for group, _ in pipes:
        ms = [("clean",)]
        if spec.evaluation.ce_loss:
            for hp in group:
                ms.append(("zero", hp))
                ms += [("sae", hp, n) for n in paths[hp]]
        modes_of[tuple(group)] = ms

    def push(actors, b, mode, sl):
        x = ctx.ids[sl]
        y = Y[row_off[sl.start]:row_off[sl.stop]] if Y is not None else None
        ref = x
        for i, a in enumerate(actors):
            last = i == len(actors) - 1
            ref = a.forward.remote(b, mode, ref, ctx.keep[sl], y, ctx.ids[sl] if last else None)
        return ref

    B = spec.evaluation.batch_size
    slices = [slice(a, min(a + B, len(ctx))) for a in range(0, len(ctx), B)]
    sums: dict[tuple, list[float]] = {}
    t0 = time.perf_counter()
    with progress("evaluate", total=len(slices), unit="batch") as bar:
        for b, sl in enumerate(slices):
            refs = []
            for group, actors in pipes:
                for mode in modes_of[tuple(group)]:
                    refs.append(((tuple(group), mode), push(actors, b, mode, sl)))
            for key, r in refs:
                out = ray.get(r)
                s = sums.setdefault(key, [0.0, 0, 0.0])
                s[0] += out["loss_sum"]
                s[1] += out["n"]
                s[2] += out["kl_sum"]
            bar.advance(1)
        if names:
            ray.get([a.choose_concepts.remote() for _, actors in pipes for a in actors])
            for b, sl in enumerate(slices):
                ray.get([push(actors, b, ("values",), sl) for _, actors in pipes])
    stats: dict[str, dict] = {}
    for _, actors in pipes:
        for r in ray.get([a.results.remote(names) for a in actors]):
            stats.update(r)
    for _, actors in pipes:
        for a in actors:
            ray.kill(a)

    def mean(key):
        s = sums[key]
        return s[0] / max(s[1], 1), s[2] / max(s[1], 1)

    out: dict[str, dict] = {}
    clean_losses = []
    for group, _ in pipes:
        g = tuple(group)
        l_clean, _ = mean((g, ("clean",)))
        clean_losses.append(l_clean)
        for hp in group:
            for n in paths[hp]:
                r = dict(stats[hp][n])
                r["path"] = paths[hp][n]
                r["loss_clean"] = l_clean
                if spec.evaluation.ce_loss:
                    l_zero, _ = mean((g, ("zero", hp)))
                    l_sae, kl = mean((g, ("sae", hp, n)))
                    denom = l_zero - l_clean
                    r.update(loss_zero=l_zero, loss_sae=l_sae, kl=kl,
                             ce_loss_recovered=(l_zero - l_sae) / denom if abs(denom) > 1e-9 else math.nan)
                out.setdefault(hp, {})[n] = r
    wall = time.perf_counter() - t0
    detail = {"heldout_contexts": len(ctx), "heldout_tokens": int(ctx.keep.sum()), "concept_names": names,
              "loss_clean": float(np.mean(clean_losses)), "saes": out}
    run.write_json("report/eval.json", detail)
    light = {hp: {n: {k: v for k, v in r.items() if k != "concepts"} for n, r in d.items()} for hp, d in out.items()}
    manifest.section("evaluate").update({"loss_clean": detail["loss_clean"], "saes": light,
                                         "heldout_tokens": detail["heldout_tokens"], "n_concepts": len(names)})
    manifest.save()
    log.info(f"evaluate: {sum(len(d) for d in out.values())} SAEs on {detail['heldout_tokens']} held-out tokens "
             f"in {wall:.1f} s; clean loss {detail['loss_clean']:.3f}")
    return {"saes": sum(len(d) for d in out.values()), "heldout_tokens": detail["heldout_tokens"]}


def evaluate_stage(ctx) -> dict:
    return run_evaluate(ctx.resolved, ctx.store, ctx.manifest)

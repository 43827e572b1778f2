"""``saeray bench evaluate``: evaluation's forward passes per second with every intervention pass
run through the whole model ("full", as before) and started at its hook point's block from the clean
pass's kept hidden states ("resumed", saeray/evaluate/job.py), on the same held-out batches of an
audit spec (default jobs/smollm2.yaml: 30 layers, hook points at layers 4, 14 and 24).

Per held-out batch the evaluate stage runs one clean pass, then per hook point one zero-ablation
and one splice per SAE. The SAEs are the spec's architectures and widths, randomly initialised:
no harvest or training is needed, and a splice costs the same whatever the weights. So only the
timings and the agreement of the two ways are figures here; their CE losses are those of random
SAEs. The workers are the pool's own (``PoolWorker`` + ``EvalJob``, the spec's layer split), run in
this process without Ray, one after the other for each batch, so the two ways see the same machine.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace

import torch

log = logging.getLogger("saeray")


def _saes(spec, widths: dict[str, int], root: str) -> dict[str, dict[str, str]]:
    from ..sae import io
    from ..sae.registry import build

    torch.manual_seed(0)
    out: dict[str, dict[str, str]] = {}
    for hp, d in widths.items():
        for i, v in enumerate(spec.sae.architectures):
            sae = build(v.arch, d, v.width, k=v.k, l1=v.l1, **v.opts())
            out.setdefault(hp, {})[f"{v.arch}-{i}"] = io.save(sae, f"{root}/{hp}/{v.arch}-{i}")
    return out


def run_bench(spec_path: str = "jobs/smollm2.yaml", batches: int = 1, batch_size: int | None = None,
              threads: int = 2) -> dict:
    from ..errors import InputError
    from ..evaluate.job import EvalJob, add_losses
    from ..harvest.corpus import corpus_for
    from ..harvest.stage import plan
    from ..models.hookpoints import parse
    from ..models.pool import Load, PoolWorker
    from ..models.shard import route
    from ..run.targets import expand_targets
    from ..spec import load_spec

    torch.set_num_threads(threads)
    spec = load_spec(spec_path)
    if spec.sae is None:
        raise InputError(f"--spec {spec_path}: it has no sae section, so there are no SAEs to evaluate")
    target = expand_targets(spec)[0]
    p = plan(spec, target)
    B = batch_size or spec.evaluation.batch_size
    heldout = corpus_for(spec.corpus, target.ref.tokenizer()).heldout()
    slices = [slice(a, min(a + B, len(heldout))) for a in range(0, min(len(heldout), batches * B), B)]
    with tempfile.TemporaryDirectory() as root:
        paths = _saes(spec, p.widths, root)
        modes: list[tuple] = [("clean",)]
        for hp in p.hookpoints:
            modes += [("zero", hp)] + [("sae", hp, n) for n in paths[hp]]
        per_stage = route(p.hookpoints, p.ranges, p.n_layers, p.n_heads)
        # the worker sets torch's threads from its Load (in the audit: the spec's num_cpus)
        load = replace(Load.of(target.ref), threads=threads)
        log.info(f"bench evaluate: loading {target} as {len(p.ranges)} stage(s), two ways")
        ways = {}
        for resume in (False, True):
            ways[resume] = [PoolWorker(load, r, EvalJob, {"saes": {hp: paths[hp] for hp in st}, "n_concepts": 0,
                                                          "resume": resume})
                            for r, st in zip(p.ranges, per_stage)]
        wall = {False: 0.0, True: 0.0}
        losses: dict[bool, dict] = {False: {}, True: {}}
        tokens = 0
        for i, sl in enumerate(slices):
            tokens += int(heldout.keep[sl].sum())
            for resume in (False, True):   # alternate, so load on the machine hits both alike
                workers = ways[resume]
                key = f"b{i}"
                t0 = time.perf_counter()
                for w in workers:
                    w.begin(key)
                for mode in modes:
                    payload = {"mode": mode, "keep": heldout.keep[sl], "ids": heldout.ids[sl], "y": None}
                    x = heldout.ids[sl]
                    for w in workers:
                        x = w.forward(key, 0, x, payload)
                res = workers[-1].finish(key)
                for w in workers[:-1]:
                    w.finish(key)
                wall[resume] += time.perf_counter() - t0
                add_losses(losses[resume], res["losses"])
            log.info(f"bench evaluate: batch {i + 1}/{len(slices)}: full {wall[False]:.1f} s, resumed {wall[True]:.1f} s")
    # block computations a pass runs: all of them, or those from its hook point's layer on
    n = p.n_layers
    blocks_full = len(modes) * n
    blocks_resumed = n + sum(n - parse(m[1]).layer for m in modes[1:])
    d_ce = max(abs(losses[True][m][0] - losses[False][m][0]) / max(losses[False][m][1], 1) for m in modes)
    d_kl = max(abs(losses[True][m][2] - losses[False][m][2]) / max(losses[False][m][1], 1) for m in modes)
    passes = len(modes) * len(slices)
    return {
        "spec": spec_path, "model": target.model, "layers": n, "stages": len(p.ranges),
        "hookpoints": p.hookpoints, "saes_per_hookpoint": len(spec.sae.architectures),
        "batches": len(slices), "batch_contexts": B, "heldout_tokens": tokens, "passes": passes, "threads": threads,
        "full_s": round(wall[False], 2), "resumed_s": round(wall[True], 2),
        "full_passes_per_s": round(passes / wall[False], 3), "resumed_passes_per_s": round(passes / wall[True], 3),
        "speedup": round(wall[False] / wall[True], 3),
        "block_share_resumed": round(blocks_resumed / blocks_full, 3),
        "max_abs_diff_ce_per_token": d_ce, "max_abs_diff_kl_per_token": d_kl,
    }


def format_table(r: dict) -> str:
    lines = [f"evaluation passes on {r['model']} ({r['layers']} layers, {r['stages']} stage(s)); hook points "
             f"{', '.join(r['hookpoints'])}; {r['saes_per_hookpoint']} SAEs each; {r['batches']} batch(es) of "
             f"{r['batch_contexts']} contexts ({r['heldout_tokens']} held-out tokens), {r['passes']} passes, "
             f"{r['threads']} threads",
             "| intervention passes | wall s | passes/s |", "|---|---|---|",
             f"| through the whole model | {r['full_s']} | {r['full_passes_per_s']} |",
             f"| resumed at the hook point's block | {r['resumed_s']} | {r['resumed_passes_per_s']} |",
             f"speed-up {r['speedup']}x; blocks run, resumed / full: {r['block_share_resumed']}",
             f"largest difference per token, resumed vs full: CE {r['max_abs_diff_ce_per_token']:.2e}, "
             f"KL {r['max_abs_diff_kl_per_token']:.2e}"]
    return "\n".join(lines)

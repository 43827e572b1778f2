"""The ``train`` stage: one Ray Train run (``TorchTrainer``) per hook point of a target, all launched
at once.

Why this shape (docs/architecture.md): each ``fit()`` carries 10-20 s of fixed start-up (controller,
worker actors, process group), so the unit of a Train run is a whole hook point (every variant of
it shares one activation stream, read once), never one (hook point x architecture). ``fit()``
blocks, so each one runs inside a zero-CPU Ray task; the workers take the spec's
``resources.train`` (fractional CPUs pack several units per core or GPU).

Failure handling: ``FailureConfig(max_failures)`` restarts a dead worker group; the loop resumes
from the unit's checkpoint in the store. The driver records each finished unit
(:mod:`saeray.run.records`), so a re-run skips it. The unit itself is the one training entry point
(:func:`saeray.sae.run.fit_dataset`), the same code as ``saeray train``.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from ..errors import InputError, SaerayError
from ..run.records import Records
from ..run.stages import Result, Stage, TargetContext
from .unit import CKPT_DIR, RESULT, UnitConfig, train_unit, variant_name, variants_from_spec

log = logging.getLogger("saeray")

MAX_FAILURES = 3


def _loop(config: dict) -> None:
    # results travel through the store (Train V2 keeps reported metrics only with a checkpoint)
    train_unit(UnitConfig(**config))


def _train_run_name(run_name: str, hookpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_name}-{hookpoint}")


def fit_unit(config: dict, per_worker: dict, run_name: str, storage: tuple) -> dict:
    """Run one unit as a TorchTrainer; returns its results. Called inside a zero-CPU Ray task.
    ``per_worker``: Ray resources of each training worker (CPU always given, even 0)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage
    trainer = TorchTrainer(
        _loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config.get("workers", 1), use_gpu=bool(per_worker.get("GPU")),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=_train_run_name(run_name, config["hookpoint"]), storage_path=storage_path,
                             storage_filesystem=storage_fs, failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise SaerayError(f"training {config['hookpoint']} failed: {result.error}")
    from ..store import Store

    run = Store(config["run_url"], config["store_options"])
    return run.read_json(f"saes/{config['hookpoint']}/{CKPT_DIR}/{RESULT}")


def fit_unit_task(config: dict) -> dict:
    """Run one unit in the calling Ray task (``launcher: task``): the same unit, resumed from its
    checkpoint when Ray retries the task after a worker died."""
    return train_unit(UnitConfig(**config))


def _storage(store) -> tuple:
    """Where Ray Train keeps its own run state: inside the target's folder, on the store's filesystem."""
    if store.is_local:
        return store.path("saes/_ray_train"), None
    fs, _ = store.arrow_fs()
    return store.path("saes/_ray_train"), fs


@dataclass
class TrainResult(Result):
    saes: dict = field(default_factory=dict)   # hookpoint -> variant -> {path (in the target folder), arch, ...}



def key(spec, target) -> dict:
    from ..harvest.stage import key as harvest_key

    if spec.sae is None:
        return {**harvest_key(spec, target), "sae": None}
    t = spec.sae.train.model_dump(mode="json")
    t.pop("workers")   # data-parallel ranks: the same SAE up to float rounding
    t.pop("launcher")  # where the same unit runs
    if not t["warm_start"]:
        t.pop("warm_start")    # runs recorded before the option keep their key
    return {**harvest_key(spec, target), "sae.architectures": [a.model_dump(mode="json") for a in spec.sae.architectures],
            **{f"sae.train.{k}": v for k, v in t.items()}}


def check(spec, targets) -> None:
    if spec.sae is None:
        raise InputError("sae: the spec has no sae section, so there is nothing to train; add one (e.g. "
                         "sae: {architectures: [{arch: topk, width: 4096, k: 32}]}) or run `saeray harvest` only")
    variants_from_spec(spec.sae)
    if spec.sae.train.warm_start:
        from ..sae.train import WARM_STARTABLE

        bad = [a.arch for a in spec.sae.architectures if a.arch not in WARM_STARTABLE]
        if bad:
            raise InputError(f"sae.train.warm_start: {bad[0]} SAEs cannot start from another checkpoint's exactly; "
                             "warm-start relu and topk only, or set warm_start: false")


WARM_POLL_S = 2.0


def previous_checkpoint(ctx: TargetContext):
    """The target whose SAEs this one starts from: the same model's previous revision in the spec."""
    from ..run.targets import expand_targets

    same = [t for t in expand_targets(ctx.spec) if t.model == ctx.target.model]
    i = [t.id for t in same].index(ctx.target.id)
    return same[i - 1] if i > 0 else None


def wait_for_train(ctx: TargetContext, prev) -> dict:
    """The previous checkpoint's train result, once its thread (in this audit) has finished it."""
    while True:
        if prev.id not in ctx.manifest.data["targets"]:
            raise InputError(f"sae.train.warm_start: {ctx.target} starts from {prev}, which is not in this run; run "
                             "every revision together (no --revision) or set warm_start: false")
        rec = ctx.manifest.stage(prev.id, "train")
        if rec.get("status") == "done":
            return rec["result"]
        if rec.get("status") == "failed" or ctx.manifest.stage(prev.id, "harvest").get("status") == "failed":
            raise SaerayError(f"train {ctx.target}: {prev} failed, so there is nothing to warm-start from")
        time.sleep(WARM_POLL_S)


def run(ctx: TargetContext, inputs: dict) -> TrainResult:
    import ray

    spec, target, store = ctx.spec, ctx.target, ctx.store
    hookpoints = inputs["harvest"].hookpoints
    variants = variants_from_spec(spec.sae)
    names = [variant_name(v) for v in variants]
    records = Records(store, "train")
    done = records.load()
    todo = [hp for hp in hookpoints if not (hp in done and all(n in done[hp]["saes"] for n in names))]
    t = spec.sae.train
    res = spec.resources.train
    per_worker = {"CPU": res.num_cpus, **res.ray_options()}
    log.info(f"train {target}: {len(todo)} of {len(hookpoints)} hook points to train ({len(hookpoints) - len(todo)} "
             f"done), {len(variants)} SAE variants each, {t.tokens} tokens per SAE")
    if t.launcher == "task":
        task = ray.remote(fit_unit_task).options(**res.task_options(), max_retries=MAX_FAILURES)

        def launch(cfg: dict):
            return task.remote(cfg)
    else:
        fit_task = ray.remote(num_cpus=0)(fit_unit)
        storage = _storage(store)
        run_name = f"{ctx.manifest.data['run']}-{target.id}"

        def launch(cfg: dict):
            return fit_task.remote(cfg, per_worker, run_name, storage)
    warm: dict[str, dict[str, str]] = {}
    prev = previous_checkpoint(ctx) if t.warm_start and todo else None
    if prev is not None:
        log.info(f"train {target}: waiting for {prev}'s SAEs to start from (warm start)")
        before = wait_for_train(ctx, prev)["saes"]
        pstore = ctx.run / prev.folder
        warm = {hp: {n: pstore.url_of(before[hp][n]["path"]) for n in names} for hp in todo}
    pending = {}
    for hp in todo:
        cfg = UnitConfig(run_url=store.url, store_options=store.options, hookpoint=hp, variants=variants,
                         tokens=t.tokens, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                         checkpoint_every=t.checkpoint_every, epochs_max=t.epochs_max, workers=t.workers,
                         threads=max(1, int(res.num_cpus)), model=target.model,
                         meta={"revision": target.revision}, warm=warm.get(hp))
        pending[launch(cfg.to_dict())] = (hp, time.perf_counter())
    errors = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        hp, t0 = pending.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - report every failed unit, keep the finished ones
            errors.append(f"{hp}: {e}")
            log.error(f"train {target} {hp}: failed: {e}")
            continue
        records.put(hp, {"saes": out, "wall_s": round(time.perf_counter() - t0, 2)})
        log.info(f"train {target} {hp}: done: " + ", ".join(
            f"{n} fvu={r['train_sample']['fvu']:.3f} l0={r['train_sample']['l0']:.1f}" for n, r in out.items()))
    if errors:
        raise SaerayError(f"training failed for {target}: " + "; ".join(errors))
    recs = records.consolidate()
    return TrainResult({hp: {n: recs[hp]["saes"][n] for n in names} for hp in hookpoints})


STAGE = Stage("train", needs=("harvest",), key=key, check=check, run=run, result=TrainResult)

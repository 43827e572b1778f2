"""The ``train`` stage: one Ray Train run (``TorchTrainer``) per hook point, all launched at once.

Why this shape (docs/architecture.md): each ``fit()`` carries 10-20 s of fixed start-up (controller,
worker actors, process group), so the unit of a Train run is a whole hook point (every variant of
it shares one activation stream, read once), never one (hook point x architecture). ``fit()``
blocks, so each one runs inside a zero-CPU Ray task; the workers take the spec's
``resources.train`` (fractional CPUs pack several units per core or GPU).

Failure handling: ``FailureConfig(max_failures)`` restarts a dead worker group; the loop resumes
from the unit's checkpoint in the store. The driver records each finished unit in the manifest, so
re-running a finished audit skips it.
"""
from __future__ import annotations

import logging
import re
import time

from ..errors import SaerayError
from .unit import CKPT_DIR, RESULT, UnitConfig, sae_rel, train_unit, variant_name, variants_from_spec

log = logging.getLogger("saeray")

MAX_FAILURES = 3


def _loop(config: dict) -> None:
    # results travel through the store (Train V2 keeps reported metrics only with a checkpoint)
    train_unit(UnitConfig(**config))


def _train_run_name(run_name: str, hookpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_name}-{hookpoint}")


def fit_unit(config: dict, resources: dict, run_name: str, storage: tuple) -> dict:
    """Run one unit as a TorchTrainer; returns its results. Called inside a zero-CPU Ray task."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage
    num_gpus = resources.get("num_gpus", 0) or 0
    per_worker = {"CPU": resources.get("num_cpus", 1.0)}
    if num_gpus:
        per_worker["GPU"] = num_gpus
    if resources.get("memory_gb"):
        per_worker["memory"] = int(resources["memory_gb"] * 2**30)
    trainer = TorchTrainer(
        _loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config.get("workers", 1), use_gpu=bool(num_gpus),
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


def _storage(run) -> tuple:
    """Where Ray Train keeps its own run state: inside the run folder, on the store's filesystem."""
    if run.is_local:
        return run.path("saes/_ray_train"), None
    fs, _ = run.arrow_fs()
    return run.path("saes/_ray_train"), fs


def run_train(spec, run, manifest) -> dict:
    import ray

    sec = manifest.section("train")
    hookpoints = manifest.data.get("harvest", {}).get("hookpoints") or []
    if not hookpoints:
        raise SaerayError("nothing to train: the run has no harvested hook points (run the harvest stage first)")
    variants = variants_from_spec(spec.sae)
    names = [variant_name(v) for v in variants]
    units = sec.setdefault("units", {})
    todo = [hp for hp in hookpoints
            if not (hp in units and all(n in units[hp].get("saes", {}) for n in names))]
    t = spec.sae.train
    res = spec.resources.train.model_dump()
    log.info(f"train: {len(todo)} of {len(hookpoints)} hook points to train ({len(hookpoints) - len(todo)} done), "
             f"{len(variants)} SAE variants each, {t.tokens} tokens per SAE")
    fit_task = ray.remote(num_cpus=0)(fit_unit)
    storage = _storage(run)
    pending = {}
    for hp in todo:
        cfg = UnitConfig(run_url=run.url, store_options=run.options, hookpoint=hp, variants=variants,
                         tokens=t.tokens, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                         checkpoint_every=t.checkpoint_every, epochs_max=t.epochs_max, workers=t.workers,
                         threads=max(1, int(res["num_cpus"])),
                         model=spec.model.name)
        pending[fit_task.remote(cfg.to_dict(), res, manifest.data["run"], storage)] = (hp, time.perf_counter())
    errors = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        hp, t0 = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - report every failed unit, keep the finished ones
            errors.append(f"{hp}: {e}")
            log.error(f"train {hp}: failed: {e}")
            continue
        units[hp] = {"saes": out, "wall_s": round(time.perf_counter() - t0, 2)}
        manifest.save()
        log.info(f"train {hp}: done in {units[hp]['wall_s']} s: " + ", ".join(
            f"{n} fvu={r['train_sample']['fvu']:.3f} l0={r['train_sample']['l0']:.1f}" for n, r in out.items()))
    if errors:
        raise SaerayError("training failed for " + "; ".join(errors))
    return {"units": len(hookpoints), "saes": len(hookpoints) * len(variants)}


def train_stage(ctx) -> dict:
    return run_train(ctx.resolved, ctx.store, ctx.manifest)


def sae_paths(run, manifest) -> dict[str, dict[str, str]]:
    """{hookpoint: {variant: url}} of the SAEs the manifest records."""
    out: dict[str, dict[str, str]] = {}
    for hp, u in manifest.data.get("train", {}).get("units", {}).items():
        out[hp] = {n: run.url_of(sae_rel(hp, n)) for n in u["saes"]}
    return out

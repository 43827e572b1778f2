"""``saeray audit``: the whole pipeline for one spec, as a sequence of resumable stages.

Each stage records itself in the run manifest with its wall time; a stage that is done is skipped
on a re-run (stages resume internally at their own granularity: harvest by work unit, training by
checkpoint). The same entrypoint runs on a laptop (a local Ray is started) and under
``ray job submit`` (it joins the job's cluster).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .errors import InputError
from .manifest import Manifest
from .raycluster import connect
from .spec import AuditSpec
from .store import Store

log = logging.getLogger("saeray")


@dataclass
class RunContext:
    spec: AuditSpec          # as written: ${ENV} placeholders kept; safe to serialise
    resolved: AuditSpec      # placeholders substituted; in memory only
    store: Store             # the run folder: <store>/<spec.name>
    manifest: Manifest


def open_run(spec: AuditSpec, store_url: str | None = None) -> RunContext:
    if store_url:
        spec = spec.with_store(store_url)
    resolved = spec.resolved()
    run_store = Store.from_spec(resolved.store) / spec.name
    manifest = Manifest.load_or_create(run_store, spec.name, spec.to_dict(), spec.hash())
    return RunContext(spec, resolved, run_store, manifest)


def _stages() -> list[tuple[str, Callable[[RunContext], dict]]]:
    from .evaluate.run import evaluate_stage
    from .harvest.run import harvest_stage
    from .report.html import report_stage
    from .train.launch import train_stage

    return [("harvest", harvest_stage), ("train", train_stage), ("evaluate", evaluate_stage),
            ("report", report_stage)]


# The spec sections each stage's output depends on. A finished stage is reused only while these are
# unchanged (resources and store may change freely); otherwise the run refuses rather than mix
# results made with different settings.
STAGE_INPUTS = {
    "harvest": ("model", "corpus", "hookpoints", "harvest"),
    "train": ("model", "corpus", "hookpoints", "harvest", "sae"),
    "evaluate": ("model", "corpus", "hookpoints", "harvest", "sae", "evaluation"),
}
ALWAYS_RERUN = {"report"}   # cheap, and reflects whatever the manifest now holds


def run_stage(ctx: RunContext, name: str, fn: Callable[[RunContext], dict]) -> dict:
    key = {sec: ctx.spec.hash(sec) for sec in STAGE_INPUTS.get(name, ())}
    if ctx.manifest.stage_done(name) and name not in ALWAYS_RERUN:
        old = ctx.manifest.stage(name).get("key") or {}
        changed = [sec for sec in key if sec in old and old[sec] != key[sec]]
        if changed:
            raise InputError(f"run {ctx.store.url} finished stage '{name}' with other settings "
                             f"({', '.join(changed)} changed); use a new run name (the spec's 'name') "
                             "or delete the run folder to start over")
        log.info(f"stage {name}: already done, skipped")
        return ctx.manifest.stage(name)
    log.info(f"stage {name}: started")
    ctx.manifest.set_stage(name, status="running")
    t0 = time.perf_counter()
    try:
        out = fn(ctx) or {}
    except BaseException:
        ctx.manifest.set_stage(name, status="failed")
        raise
    wall = time.perf_counter() - t0
    ctx.manifest.set_stage(name, **{**out, "status": "done", "wall_s": round(wall, 2), "key": key})
    log.info(f"stage {name}: done in {wall:.1f} s")
    return ctx.manifest.stage(name)


def run_audit(spec: AuditSpec, store_url: str | None = None, address: str | None = None) -> dict:
    ctx = open_run(spec, store_url)
    connect(address)
    t0 = time.perf_counter()
    for name, fn in _stages():
        run_stage(ctx, name, fn)
    from .report.summary import build_summary

    summary = build_summary(ctx.manifest.data, ctx.store.url)
    summary["total_wall_s"] = round(time.perf_counter() - t0, 2)
    ctx.store.write_json("report/summary.json", summary)
    summary["report"] = ctx.store.url_of("report/index.html")
    summary["summary"] = ctx.store.url_of("report/summary.json")
    for n, t in summary["stage_wall_s"].items():
        log.info(f"{n}: {t} s")
    return summary

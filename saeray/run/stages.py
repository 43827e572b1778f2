"""The stage protocol: every per-target step of an audit (harvest, train, evaluate, and the sweeps
that come next) is one :class:`Stage` in one registry.

A stage declares

* ``needs``: the stages whose results it reads (their typed results are passed in);
* ``key(spec, target)``: exactly the fields its output depends on, as ``{"dotted.path": value}``
  with the resolved revision included. A finished stage is reused while its key is unchanged, and a
  run whose key changed is refused, naming the fields, instead of mixing results made with other
  settings. Resources, replicas, pipelines, batch sizes and in-flight limits are not in any key,
  so changing them never invalidates finished work;
* ``check(spec, targets)``: runs for the whole spec before anything starts, so a spec that cannot
  finish fails before the first forward pass, with the YAML path and what to do;
* ``run(ctx, inputs) -> result``: the work, resumable at its own granularity (harvest by work unit,
  training by hook point and checkpoint); ``result`` is a dataclass with ``to_dict``/``from_dict``,
  recorded in the manifest when the stage finishes.

An *incremental* stage (the sweeps) keys its work items by their own settings: a change in its own
part of the key (``sweeps...``) re-runs it, reusing every finished item, instead of being refused.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..errors import InputError
from ..manifest import Manifest
from ..store import Store
from .targets import Target

log = logging.getLogger("saeray")


@dataclass
class TargetContext:
    """What a stage sees for one target."""

    spec: Any                 # the resolved AuditSpec (placeholders substituted; never written out)
    written: Any              # the spec as written (placeholders kept): what keys are computed from
    target: Target
    run: Store                # the run folder
    store: Store              # the target's folder, <run>/targets/<model>@<revision>
    manifest: Manifest

    def section(self, stage: str) -> dict:
        """This target's record of ``stage`` in the manifest (status, key, result, wall_s)."""
        return self.manifest.stage(self.target.id, stage)


class Result:
    """Base of the stages' typed results (dataclasses): recorded in the manifest as a dict, handed
    back as the dataclass to the stages that need it."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    key: Callable[[Any, Target], dict]
    check: Callable[[Any, list[Target]], None]
    run: Callable[[TargetContext, dict], Any]
    result: type
    incremental: bool = False
    # the needs for a given spec, when they depend on it (a look-up sweep needs no SAEs); default: needs
    needs_for: Callable[[Any], tuple[str, ...]] | None = None

    def needs_of(self, spec) -> tuple[str, ...]:
        return self.needs if self.needs_for is None else self.needs_for(spec)


def registry() -> dict[str, Stage]:
    """Every per-target stage, in the order they run."""
    from ..dashboards.stage import STAGE as dashboards
    from ..emergence.presence import STAGE as presence
    from ..evaluate.stage import STAGE as evaluate
    from ..harvest.stage import STAGE as harvest
    from ..sweeps.stage import STAGE as sweeps
    from ..train.stage import STAGE as train

    return {s.name: s for s in (harvest, train, evaluate, presence, sweeps, dashboards)}


def select(names: list[str], spec=None) -> list[Stage]:
    """``names`` and everything they need (for ``spec``), in registry order."""
    reg = registry()
    want: set[str] = set()

    def add(n: str) -> None:
        if n not in want:
            want.add(n)
            for m in (reg[n].needs if spec is None else reg[n].needs_of(spec)):
                add(m)

    for n in names:
        add(n)
    return [s for n, s in reg.items() if n in want]


def check_all(spec, targets: list[Target], stages: list[Stage]) -> None:
    """Every input a run reads is checked here, in the driver, before any actor starts: each
    model's config, tokenizer and weight files (a truncated or pickled checkpoint would otherwise
    fail inside a shard actor), then each stage's own checks (corpus, hook points, SAE settings)."""
    for t in targets:
        t.ref.config()
        t.ref.check_weights()
    for st in stages:
        st.check(spec, targets)


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def run_stage(ctx: TargetContext, stage: Stage, inputs: dict[str, Any]) -> Any:
    """Run (or reuse) one stage for one target."""
    rec = ctx.section(stage.name)
    key = stage.key(ctx.written, ctx.target)
    changed = _changed(rec["key"], key) if rec.get("key") is not None else []
    # an incremental stage re-runs on a change in its own part of the key; anything else is refused
    own = [c for c in changed if stage.incremental and c.split(".")[0] == stage.name]
    refused = [c for c in changed if c not in own]
    if refused:
        verb = "finished" if rec.get("status") == "done" else "started"
        raise InputError(f"run {ctx.run.url}: target {ctx.target} {verb} stage '{stage.name}' with other "
                         f"settings ({', '.join(refused)} changed); use a new run name (the spec's 'name') or "
                         "delete the run folder to start over")
    # a series' retention deletes old runs' activations (saeray.schedule.retention): resuming such
    # a run harvests again rather than handing on files that are gone
    if rec.get("status") == "done" and not own and not rec.get("pruned"):
        log.info(f"{ctx.target}: stage {stage.name} already done, skipped")
        return stage.result.from_dict(rec["result"])
    log.info(f"{ctx.target}: stage {stage.name} started")
    rec.pop("pruned", None)
    ctx.manifest.set_stage(ctx.target.id, stage.name, status="running", key=key)
    t0 = time.perf_counter()
    try:
        out = stage.run(ctx, inputs)
    except BaseException:
        ctx.manifest.set_stage(ctx.target.id, stage.name, status="failed")
        raise
    wall = time.perf_counter() - t0
    ctx.manifest.set_stage(ctx.target.id, stage.name, status="done", wall_s=round(wall, 2), result=out.to_dict())
    log.info(f"{ctx.target}: stage {stage.name} done in {wall:.1f} s")
    return out

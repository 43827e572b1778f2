"""The harvest driver: pipelines of shard actors stream token batches through a frozen model and
write every requested hook point to Parquet, unit by unit, recording finished units in the run
manifest.

Shape of the work::

    driver ──ids──▶ stage 0 actor ──hidden (object store)──▶ stage 1 actor ──▶ ...   (one pipeline)
                     │ writes hook points of layers [0,a)      │ writes those of [a,b)
                     ▼                                          ▼
                  <run>/acts/<hookpoint>/part-<unit>.parquet (atomic)  ──▶  manifest records the unit

``harvest.replicas`` pipelines run side by side (data parallel); each keeps at most
``harvest.max_in_flight`` batches in flight (backpressure), so the driver holds only object
references and its memory does not grow with the corpus. A unit counts as done only when every
stage has closed its files and the driver has recorded them; a re-run skips recorded units and
rewrites the rest under the same deterministic names, so rows are never lost or duplicated. A shard
actor that dies is restarted by Ray; the units it held are re-run as new attempts.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, SaerayError
from ..manifest import Manifest
from ..modelref import ModelRef, resolve_model
from ..progress import progress
from ..store import Store
from .corpus import Corpus, Units

log = logging.getLogger("saeray")
MAX_ATTEMPTS = 4


@dataclass
class Plan:
    ref: ModelRef
    hookpoints: list[str]
    widths: dict[str, int]
    ranges: list[tuple[int, int]]
    per_stage: list[list[str]]
    n_layers: int
    d_model: int
    n_heads: int = 0


def plan(spec, revision: str | None) -> Plan:
    from ..models import hooks
    from ..models.arch import view
    from ..models.hookpoints import HookPointError, expand
    from ..models.shard import check_boundaries, even_boundaries, route

    ref = resolve_model(spec.model, revision)
    arch = view(ref.meta_model())
    try:
        points = expand(spec.hookpoints, arch.n_layers, arch.n_heads)
    except HookPointError as e:
        raise InputError(f"hookpoints: {e}") from None
    names = [hp.name for hp in points]
    ranges = check_boundaries(even_boundaries(arch.n_layers, spec.harvest.stages), arch.n_layers)
    per_stage = route(names, ranges, arch.n_layers, arch.n_heads)
    widths = {hp.name: hooks.width(arch, hp) for hp in points}
    return Plan(ref, names, widths, ranges, per_stage, arch.n_layers, arch.d_model, arch.n_heads)


def harvest_key(spec, p: Plan) -> dict:
    """What the harvested rows depend on; a run whose manifest disagrees cannot be resumed."""
    c = spec.corpus
    return {"model": spec.model.name, "revision": p.ref.label, "dtype": spec.model.dtype,
            "hookpoints": p.hookpoints, "act_dtype": spec.harvest.dtype, "source": c.source,
            "text_field": c.text_field, "n_docs": c.n_docs, "context_len": c.context_len, "seed": c.seed,
            "drop_bos": c.drop_bos, "unit_contexts": spec.harvest.unit_contexts}


@dataclass
class _Pipe:
    actors: list
    inflight: deque = field(default_factory=deque)   # (unit, attempt, ref of last stage)
    cur: Any = None                                  # (unit, attempt, iterator of batches)


def _batches(ctx, B: int):
    for a in range(0, len(ctx), B):
        yield ctx.slice(a, a + B)


def run_harvest(spec, run: Store, manifest: Manifest, revision: str | None = None,
                threads_per_actor: int | None = None) -> dict:
    """Harvest ``spec`` (resolved) into ``run``; returns totals. Resumes from the manifest."""
    import ray

    from .shard_worker import make_actor_class

    p = plan(spec, revision)
    key = harvest_key(spec, p)
    sec = manifest.section("harvest")
    if sec.get("units") and sec.get("key") != key:
        changed = [k for k in key if sec.get("key", {}).get(k) != key[k]]
        raise InputError(f"run {run.url} already holds a harvest made with other settings ({', '.join(changed)}); "
                         "use a new run name, or delete the run folder to start over")
    sec.update({"key": key, "model": spec.model.name, "revision": p.ref.label, "hookpoints": p.hookpoints,
                "widths": p.widths, "stages": [list(r) for r in p.ranges]})
    sec.setdefault("units", {})
    manifest.save()

    tok = p.ref.tokenizer()
    corpus = Corpus(spec.corpus, tok)
    units = Units(spec.corpus.n_docs, spec.harvest.unit_contexts)
    done = set(sec["units"])
    todo = deque((u, 0) for u in range(units.count) if Units.name(u) not in done)
    swept = run.sweep_tmp("acts")
    if swept:
        log.info(f"harvest: removed {swept} temporaries left by an interrupted run")
    if not todo:
        return _totals(sec)
    log.info(f"harvest: {len(todo)} of {units.count} units to do ({len(done)} already recorded); "
             f"{len(p.hookpoints)} hook points, {len(p.ranges)} stage(s) x {spec.harvest.replicas} pipeline(s)")

    res = spec.resources.harvest
    Actor = make_actor_class()
    meta = {"model": spec.model.name, "revision": p.ref.label}
    device = "cuda" if res.num_gpus > 0 else "cpu"
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    threads = threads_per_actor or max(1, int(res.num_cpus))
    pipes = [
        _Pipe([Actor.options(**opts).remote(p.ref.path, p.ref.revision, r, hps, p.widths, run, spec.harvest.dtype,
                                            meta, spec.model.dtype, device, p.ref.trust_remote_code, threads)
               for r, hps in zip(p.ranges, p.per_stage)])
        for _ in range(spec.harvest.replicas)
    ]
    expected: dict[str, int] = {}
    attempts: dict[str, int] = {}
    finishing: dict[Any, tuple[str, int, int]] = {}  # finish ref -> (unit, attempt, pipe index)
    pending_finish: dict[tuple[str, int], list] = {}
    dead_units: set[tuple[str, int]] = set()
    B, max_inflight = spec.harvest.batch_size, spec.harvest.max_in_flight
    total_ctx = sum(units.bounds(u)[1] - units.bounds(u)[0] for u, _ in todo)
    tokens = 0

    def fail(unit: str, attempt: int, err: BaseException) -> None:
        if (unit, attempt) in dead_units:
            return
        dead_units.add((unit, attempt))
        n = attempt + 1
        if n >= MAX_ATTEMPTS:
            raise SaerayError(f"harvest unit {unit} failed {n} times; last error: {err}") from err
        log.warning(f"harvest unit {unit} attempt {attempt} failed ({type(err).__name__}: {str(err)[:200]}); retrying")
        if _actor_trouble(err):
            # a dead actor is being restarted (model reload: seconds, more on a loaded machine);
            # retrying before it answers again fails at once and would use up every attempt
            _wait_alive([a for pp in pipes for a in pp.actors])
        todo.appendleft((int(unit), n))
        for pipe in pipes:
            if pipe.cur is not None and pipe.cur[:2] == (unit, attempt):
                pipe.cur = None

    t0 = time.perf_counter()
    t_first: float | None = None
    tokens_first = 0
    with progress("harvest", total=total_ctx, unit="ctx") as bar:
        while todo or any(pp.inflight or pp.cur for pp in pipes) or finishing:
            # feed every pipeline up to its in-flight limit
            for pi, pipe in enumerate(pipes):
                while len(pipe.inflight) < max_inflight:
                    if pipe.cur is None:
                        if not todo:
                            break
                        u, att = todo.popleft()
                        unit = Units.name(u)
                        ctx = corpus.contexts(*units.bounds(u))
                        expected[unit] = ctx.rows()
                        attempts[unit] = att
                        for a in pipe.actors:
                            a.begin.remote(unit, att)
                        pipe.cur = (unit, att, _batches(ctx, B))
                    unit, att, it = pipe.cur
                    batch = next(it, None)
                    if batch is None:
                        refs = [a.finish.remote(unit, att) for a in pipe.actors]
                        pending_finish[(unit, att)] = refs
                        for r in refs:
                            finishing[r] = (unit, att, pi)
                        pipe.cur = None
                        continue
                    x: Any = batch.ids
                    for a in pipe.actors:
                        x = a.forward.remote(unit, att, x, batch.doc, batch.ids, batch.keep)
                    pipe.inflight.append((unit, att, x, (len(batch), batch.rows())))
            waiting = [e[2] for pp in pipes for e in pp.inflight] + list(finishing)
            if not waiting:
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            if not ready:
                continue
            r = ready[0]
            if r in finishing:
                unit, att, _ = finishing.pop(r)
                refs = pending_finish.get((unit, att), [])
                if all(x not in finishing for x in refs):
                    pending_finish.pop((unit, att), None)
                    if (unit, att) in dead_units:
                        continue
                    try:
                        parts = ray.get(refs)
                    except Exception as e:  # noqa: BLE001 - any actor/task failure means: re-run the unit
                        fail(unit, att, e)
                        continue
                    _record(manifest, sec, unit, parts, expected[unit], p.hookpoints)
                continue
            for pipe in pipes:
                for i, (unit, att, ref, rows) in enumerate(pipe.inflight):
                    if ref == r:
                        del pipe.inflight[i]
                        if (unit, att) not in dead_units:
                            try:
                                ray.get(ref)
                                tokens += rows[1]
                                if t_first is None:  # start of the steady state: actors up, model loaded
                                    t_first, tokens_first = time.perf_counter(), tokens
                                bar.advance(rows[0], tok=tokens, tok_per_s=round(tokens / (time.perf_counter() - t0)))
                            except Exception as e:  # noqa: BLE001
                                fail(unit, att, e)
                        break
                else:
                    continue
                break
    t_end = time.perf_counter()
    for pipe in pipes:
        for a in pipe.actors:
            ray.kill(a)
    out = _totals(sec)
    out["loop_wall_s"] = round(t_end - t0, 2)
    out["tokens_per_s"] = round(tokens / max(out["loop_wall_s"], 1e-9), 1)
    out["tokens"] = tokens  # harvested by this call (a resumed run counts only what it did)
    if t_first is not None:
        # after the first batch came back: excludes actor start-up and model loading, a fixed cost
        out["first_batch_s"] = round(t_first - t0, 3)
        out["steady_wall_s"] = round(t_end - t_first, 3)
        out["steady_tokens_per_s"] = round((tokens - tokens_first) / max(out["steady_wall_s"], 1e-9), 1)
    return out


def _actor_trouble(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) or isinstance(getattr(err, "cause", None), RayActorError)


def _wait_alive(actors: list, timeout_s: float = 300.0) -> None:
    """Block until every actor answers (restarted ones included); fail if one is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get([a.pid.remote() for a in actors], timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorDiedError as e:
            raise SaerayError(f"a harvest shard actor died and could not be restarted: {e}") from e
        except (ActorUnavailableError, GetTimeoutError) as e:
            if time.monotonic() > deadline:
                raise SaerayError(f"harvest shard actors did not come back within {timeout_s:.0f} s: {e}") from e
            time.sleep(0.5)


def _record(manifest: Manifest, sec: dict, unit: str, parts: list[dict], rows: int, hookpoints: list[str]) -> None:
    files: dict[str, dict] = {}
    for part in parts:
        files.update(part)
    missing = set(hookpoints) - set(files)
    if missing:
        raise SaerayError(f"harvest unit {unit}: no files for {sorted(missing)}")
    for hp, rec in files.items():
        if rec["rows"] != rows:
            raise SaerayError(f"harvest unit {unit}: {hp} has {rec['rows']} rows, expected {rows}")
    sec["units"][unit] = {"rows": rows, "files": files}
    sec["totals"] = _totals(sec)
    manifest.save()


def _totals(sec: dict) -> dict:
    units = sec.get("units", {})
    return {"units": len(units), "rows": sum(u["rows"] for u in units.values()),
            "bytes": sum(f["bytes"] for u in units.values() for f in u["files"].values())}


def harvest_stage(ctx) -> dict:
    """The audit's harvest stage (one revision: the first in the spec)."""
    spec = ctx.resolved
    return run_harvest(spec, ctx.store, ctx.manifest, spec.model.revisions[0])

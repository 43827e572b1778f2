"""The harvest stage: one target's corpus streamed through its frozen checkpoint on the model pool,
every requested hook point written to Parquet in the target's folder, unit by unit.

``harvest.replicas`` pipelines of ``harvest.stages`` layer-range actors run side by side; each work
unit (``harvest.unit_contexts`` contexts) is one pool item. A unit counts as done once every stage
has closed its files and the driver has put the unit's record (:mod:`saeray.run.records`); a re-run
skips recorded units and rewrites the rest under the same deterministic names, so rows are never
lost or duplicated. Records are consolidated into one object when the stage finishes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import InputError, SaerayError
from ..progress import progress
from ..run.records import Records
from ..run.stages import Result, Stage, TargetContext
from .corpus import Units, corpus_for

log = logging.getLogger("saeray")


@dataclass
class Plan:
    hookpoints: list[str]
    widths: dict[str, int]
    ranges: list[tuple[int, int]]
    per_stage: list[list[str]]
    n_layers: int
    d_model: int
    n_heads: int = 0


def plan(spec, target) -> Plan:
    """Hook points, widths and the layer split of one target (no weights are read)."""
    from ..models import hooks
    from ..models.arch import view
    from ..models.hookpoints import HookPointError, expand
    from ..models.pool import stage_ranges
    from ..models.shard import route

    arch = view(target.ref.meta_model())
    try:
        points = expand(spec.hookpoints, arch.n_layers, arch.n_heads)
    except HookPointError as e:
        raise InputError(f"hookpoints ({target}): {e}") from None
    if spec.harvest.stages > arch.n_layers:
        raise InputError(f"harvest.stages: {spec.harvest.stages} stages for {target}, which has only "
                         f"{arch.n_layers} layers; use at most {arch.n_layers}")
    names = [hp.name for hp in points]
    ranges = stage_ranges(arch.n_layers, spec.harvest.stages)
    per_stage = route(names, ranges, arch.n_layers, arch.n_heads)
    widths = {hp.name: hooks.width(arch, hp) for hp in points}
    return Plan(names, widths, ranges, per_stage, arch.n_layers, arch.d_model, arch.n_heads)


@dataclass
class HarvestResult(Result):
    hookpoints: list[str]
    widths: dict[str, int]
    ranges: list[list[int]]
    units: int
    rows: int                      # rows of each hook point's dataset
    bytes: int
    tokens: int = 0                # harvested by the call that finished the stage (a resume counts its part)
    tokens_per_s: float | None = None
    timing: dict = field(default_factory=dict)



def key(spec, target) -> dict:
    c, h = spec.corpus, spec.harvest
    return {"model": target.model, "revision": target.revision, "model.dtype": target.ref.dtype,
            "hookpoints": list(spec.hookpoints), "harvest.dtype": h.dtype, "harvest.unit_contexts": h.unit_contexts,
            "corpus.source": c.source, "corpus.text_field": c.text_field, "corpus.n_docs": c.n_docs,
            "corpus.context_len": c.context_len, "corpus.seed": c.seed, "corpus.drop_bos": c.drop_bos,
            "corpus.skip_first": c.skip_first,
            # only when set: runs recorded before the option keep their key
            **({"corpus.encoding": c.encoding} if c.encoding != "utf-8" else {})}


def check(spec, targets) -> None:
    for t in targets:
        plan(spec, t)
        corpus_for(spec.corpus, t.ref.tokenizer()).check(need_heldout=False)


def totals(records: dict[str, dict]) -> dict:
    return {"units": len(records), "rows": sum(r["rows"] for r in records.values()),
            "bytes": sum(f["bytes"] for r in records.values() for f in r["files"].values())}


def run(ctx: TargetContext, inputs: dict) -> HarvestResult:
    from ..models.pool import Item, Load, ModelPool
    from .job import HarvestJob

    spec, target = ctx.spec, ctx.target
    p = plan(spec, target)
    records = Records(ctx.store, "harvest")
    corpus = corpus_for(spec.corpus, target.ref.tokenizer())
    units = Units(spec.corpus.n_docs, spec.harvest.unit_contexts)
    done = records.names()
    todo = [u for u in range(units.count) if Units.name(u) not in done]
    if ctx.store.is_local:
        # the whole target folder: records, checkpoints and sweep tables leave temporaries too (this
        # process holds the run's lease, so no writer of this run is live)
        swept = ctx.store.sweep_tmp()
        if swept:
            log.info(f"harvest {target}: removed {swept} temporaries left by an interrupted run")
    counts = {"tokens": 0, "t_first": None, "tokens_first": 0}
    timing: dict = {}
    if todo:
        log.info(f"harvest {target}: {len(todo)} of {units.count} units to do ({len(done)} already recorded); "
                 f"{len(p.hookpoints)} hook points, {len(p.ranges)} stage(s) x {spec.harvest.replicas} pipeline(s)")
        expected: dict[str, int] = {}
        B = spec.harvest.batch_size

        def batches(u: int):
            c = corpus.contexts(*units.bounds(u))
            expected[Units.name(u)] = c.rows()
            for a in range(0, len(c), B):
                b = c.slice(a, a + B)
                yield b.ids, {"doc": b.doc, "ids": b.ids, "keep": b.keep}, (len(b), b.rows())

        def on_item(unit: str, parts: list[dict]) -> None:
            files: dict[str, dict] = {}
            for part in parts:
                files.update(part)
            missing = set(p.hookpoints) - set(files)
            if missing:
                raise SaerayError(f"harvest {target} unit {unit}: no files for {sorted(missing)}")
            for hp, rec in files.items():
                if rec["rows"] != expected[unit]:
                    raise SaerayError(f"harvest {target} unit {unit}: {hp} has {rec['rows']} rows, "
                                      f"expected {expected[unit]}")
            records.put(unit, {"rows": expected[unit], "files": files})

        items = [Item(Units.name(u), lambda u=u: batches(u)) for u in todo]
        meta = {"model": target.model, "revision": target.revision}
        job_args = [{"hookpoints": hps, "widths": p.widths, "store": ctx.store, "act_dtype": spec.harvest.dtype,
                     "meta": meta} for hps in p.per_stage]
        res = spec.resources.harvest
        total_ctx = sum(units.bounds(u)[1] - units.bounds(u)[0] for u in todo)
        t0 = time.perf_counter()
        with progress(f"harvest {target}", total=total_ctx, unit="ctx") as bar:
            def on_batch(tag) -> None:
                n_ctx, rows = tag
                counts["tokens"] += rows
                if counts["t_first"] is None:
                    counts["t_first"], counts["tokens_first"] = time.perf_counter(), counts["tokens"]
                bar.advance(n_ctx, tok=counts["tokens"],
                            tok_per_s=round(counts["tokens"] / (time.perf_counter() - t0)))

            with ModelPool(Load.of(target.ref, res), p.ranges, HarvestJob, job_args, replicas=spec.harvest.replicas,
                           resources=res.ray_options(), max_in_flight=spec.harvest.max_in_flight,
                           name=f"harvest {target}") as pool:
                timing = pool.run(items, on_item, on_batch)
                timing["nodes"] = pool.node_ids()
        wall = time.perf_counter() - t0
        timing["wall_s"] = round(wall, 3)
        if counts["t_first"] is not None:
            steady = time.perf_counter() - counts["t_first"]
            timing["steady_tokens_per_s"] = round((counts["tokens"] - counts["tokens_first"]) / max(steady, 1e-9), 1)
    recs = records.consolidate()
    tot = totals(recs)
    if tot["units"] != units.count:
        raise SaerayError(f"harvest {target}: {tot['units']} of {units.count} units recorded after the run")
    loop = timing.get("loop_wall_s")
    return HarvestResult(p.hookpoints, p.widths, [list(r) for r in p.ranges], tot["units"], tot["rows"], tot["bytes"],
                         tokens=counts["tokens"],
                         tokens_per_s=round(counts["tokens"] / loop, 1) if loop else None, timing=timing)


STAGE = Stage("harvest", needs=(), key=key, check=check, run=run, result=HarvestResult)

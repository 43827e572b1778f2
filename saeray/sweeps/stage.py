"""The sweeps stage: every sweep of the spec (``sweeps:``) for one target, on the model pool.

A sweep's items (:mod:`.grid`) go to ``pipelines`` whole-model replicas; each finished item's
tables are written once and recorded, so a re-run skips finished items and redoes a killed one, and
an actor that dies is restarted and its item re-run by the pool. The stage is *incremental*: adding
a sweep to a finished audit runs just that sweep; changing a finished sweep's settings is refused
(its folder would mix two settings), naming the fields, unless it gets a new name.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field

from ..errors import InputError, SaerayError
from ..progress import progress
from ..run.stages import Result, Stage, TargetContext

log = logging.getLogger("saeray")

# settings that change no result: left out of the sweep's identity
_FREE = ("pipelines", "exact_batch")


@dataclass
class SweepsResult(Result):
    sweeps: dict = field(default_factory=dict)   # name -> grid.summarize(...) + items, wall_s


# the other method's settings, and an LLM's transport settings, change no result either
_LOOKUPS_ONLY = ("lookups",)
_GRADSAE_ONLY = ("prompts", "n_prompts", "min_prompt_len", "hookpoints", "saes", "experiments", "ks", "topk",
                 "prompts_per_item", "gradsae")
_LLM_FREE = ("api_key_env", "timeout_s", "max_retries", "max_concurrency", "requests_per_s")


def identity(sw) -> dict:
    skip = _FREE + (_GRADSAE_ONLY if sw.method == "lookups" else _LOOKUPS_ONLY)
    out = {k: v for k, v in sw.model_dump(mode="json").items() if k not in skip}
    if sw.method == "lookups" and out["lookups"].get("llm"):
        out["lookups"]["llm"] = {k: v for k, v in out["lookups"]["llm"].items() if k not in _LLM_FREE}
    return out


def key(spec, target) -> dict:
    from ..harvest.stage import key as harvest_key
    from ..train.stage import key as train_key

    base = train_key(spec, target) if needs_for(spec) else harvest_key(spec, target)
    return {**base, "sweeps": {sw.name: identity(sw) for sw in spec.sweeps}}


def _variants(spec) -> list[str]:
    from ..train.unit import variant_name, variants_from_spec

    return [variant_name(v) for v in variants_from_spec(spec.sae)] if spec.sae else []


def _choose_saes(sw, names: list[str], where: str) -> list[str]:
    if sw.saes is None:
        return names
    out = []
    for want in sw.saes:
        hit = [n for n in names if n == want or n.split("-")[0] == want]
        if not hit:
            raise InputError(f"{where}.saes: no SAE {want!r} in sae.architectures (have: {', '.join(names)}); "
                             "give a variant name or an architecture")
        out += [h for h in hit if h not in out]
    return out


def _hookpoints(spec, sw, target, where: str) -> list[str]:
    from ..harvest.stage import plan

    have = plan(spec, target).hookpoints
    if sw.hookpoints is None:
        return have
    out: list[str] = []
    for want in sw.hookpoints:   # names or globs (resid_post.*) over the audit's hook points
        hit = [h for h in have if fnmatch.fnmatchcase(h, want)]
        if not hit:
            raise InputError(f"{where}.hookpoints: {want!r} is not one of the audit's hook points "
                             f"({', '.join(have)}); sweeps run on the SAEs the audit trains")
        out += [h for h in hit if h not in out]
    return out


def check(spec, targets) -> None:
    from . import prompts

    for i, sw in enumerate(spec.sweeps):
        where = f"sweeps[{i}] ({sw.name})"
        if sw.method == "lookups":
            from .lookup_run import check as check_lookups

            check_lookups(spec, sw, targets, where)
            continue
        if spec.sae is None:
            raise InputError(f"{where}: a gradsae sweep scores SAE latents, but the spec has no 'sae:' section; add one")
        _choose_saes(sw, _variants(spec), where)
        for t in targets:
            _hookpoints(spec, sw, t, where)
        for src in sw.prompts:
            if src == "storyworld-facts" and spec.corpus.source != "storyworld":
                raise InputError(f"{where}.prompts: storyworld-facts needs a storyworld model and corpus "
                                 f"(corpus.source is {spec.corpus.source!r}); use smollm2-capitals or a .jsonl file")
            if src not in prompts.BUILTIN and not src.endswith(".jsonl"):
                raise InputError(f"{where}.prompts: {src!r} is not a prompt set; use one of "
                                 f"{', '.join(prompts.BUILTIN)} or a .jsonl file")
            if src.endswith(".jsonl"):
                prompts.read_jsonl(src)
        names = [prompts.set_name(s) for s in sw.prompts]
        if len(set(names)) != len(names):
            raise InputError(f"{where}.prompts: two prompt sets share the name {names[0]!r}; rename a file")


def _with_defaults(old: dict, default: dict) -> dict:
    """A sweep recorded by an older saeray lacks the options added since; each new option's default
    is the behaviour before it existed, so the record is read with the defaults filled in."""
    out = dict(old)
    for k, v in default.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def guard(store, sw) -> None:
    """A sweep folder holds results of one setting: refuse to add items made with another."""
    ident = identity(sw)
    try:
        old = store.read_json(f"sweeps/{sw.name}/sweep.json")
    except FileNotFoundError:
        store.write_json(f"sweeps/{sw.name}/sweep.json", ident)
        return
    old = _with_defaults(old, identity(type(sw)(name=sw.name, method=sw.method)))
    changed = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    if changed:
        raise InputError(f"sweep {sw.name!r} in {store.url} was started with other settings "
                         f"({', '.join(f'sweeps.{c}' for c in changed)} changed); give the sweep a new name")


def run_sweep(ctx: TargetContext, sw, trained, index: int) -> dict:
    from ..models.pool import Item, Load, ModelPool
    from ..run.records import Records
    from . import grid, prompts
    from .job import SweepJob

    spec, target = ctx.spec, ctx.target
    where = f"sweeps[{index}] ({sw.name})"
    hps = _hookpoints(spec, sw, target, where)
    saes = {hp: _choose_saes(sw, list(trained.saes.get(hp, {})), where) for hp in hps}
    store = ctx.store
    guard(store, sw)
    tok = target.ref.tokenizer()
    sets = {}
    for src in sw.prompts:
        ps = prompts.build(src, tok, spec.corpus, sw.n_prompts, sw.min_prompt_len)
        sets[ps.name] = ps
    records = Records(store / f"sweeps/{sw.name}", "items")
    items = grid.items_for(sw, sets, hps, saes)
    done = records.names()
    todo = [it for it in items if it.id not in done]
    log.info(f"sweep {sw.name} {target}: {len(items)} items ({len(done & {i.id for i in items})} already done), "
             f"{sum(len(p.prompts) for p in sets.values())} prompts, {len(hps)} hook point(s)")
    by_id = {it.id: it for it in todo}
    t0 = time.perf_counter()
    if todo:
        paths = {hp: {n: store.url_of(trained.saes[hp][n]["path"]) for n in saes[hp]} for hp in hps}
        res = spec.resources.sweeps
        n_layers = target.ref.meta_model().config.num_hidden_layers

        def on_item(key: str, parts: list) -> None:
            it = by_id[key]
            tabs = grid.tables(target.id, it, sets[it.prompt_set], parts[0], tok)
            for name, tab in tabs.items():
                store.write_bytes(f"sweeps/{sw.name}/{name}/{key}.parquet", grid.to_parquet(tab))
            records.put(key, {"prompts": len(it.prompt_ids), "correct": int(sum(r["correct"] for r in parts[0]))})
            bar.advance(1)

        with ModelPool(Load.of(target.ref, res), [(0, n_layers)], SweepJob, [{"saes": paths}], replicas=sw.pipelines,
                       resources=res.ray_options(), max_in_flight=2, name=f"sweep {sw.name} {target}") as pool:
            with progress(f"sweep {sw.name} {target}", total=len(todo), unit="item") as bar:
                pool.run([Item(it.id, lambda it=it: iter([(None, grid.payload(sw, it, sets[it.prompt_set]), it.id)]))
                          for it in todo], on_item)
    records.consolidate()
    out = grid.summarize(store, sw.name)
    out.update(items=len(items), wall_s=round(time.perf_counter() - t0, 2), error_term=sw.gradsae.error_term,
               output=sw.gradsae.output, aggregate=sw.gradsae.aggregate)
    store.write_json(f"sweeps/{sw.name}/summary.json", out)
    return out


def run(ctx: TargetContext, inputs: dict) -> SweepsResult:
    from . import lookup_run

    trained = inputs.get("train")
    if (trained is None or not trained.saes) and any(sw.method == "gradsae" for sw in ctx.spec.sweeps):
        raise SaerayError(f"nothing to sweep for {ctx.target}: no trained SAEs")
    return SweepsResult({sw.name: lookup_run.run(ctx, sw, i) if sw.method == "lookups" else run_sweep(ctx, sw, trained, i)
                         for i, sw in enumerate(ctx.spec.sweeps)})


def needs_for(spec) -> tuple[str, ...]:
    """Only GradSAE sweeps read SAEs; look-ups read the model alone."""
    return ("train",) if any(sw.method == "gradsae" for sw in spec.sweeps) or not spec.sweeps else ()


STAGE = Stage("sweeps", needs=("train",), key=key, check=check, run=run, result=SweepsResult, incremental=True,
              needs_for=needs_for)

"""Running a context look-up sweep for one target (called by the sweeps stage, :mod:`.stage`).

Two steps, each resumable item by item: the model pool computes every item's neurons, prompts,
heads and ablations (:class:`.lookups.LookupJob`, ``pipelines`` whole-model replicas); then CPU
Ray tasks explain and score each finished item's pairs (:mod:`.lookup_explain`), at most
``pipelines`` at a time, each with the LLM client's retries, concurrency cap and rate limit.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from ..errors import InputError
from ..progress import progress
from . import lookup_tables as lt
from .grid import read_table, to_parquet

log = logging.getLogger("saeray")


def _n_layers(target) -> int:
    return target.ref.meta_model().config.num_hidden_layers


def layers_of(sw, target, where: str) -> list[int]:
    n = _n_layers(target)
    layers = sw.lookups.layers if sw.lookups.layers is not None else lt.default_layers(n)
    bad = [l for l in layers if not 1 <= l < n]
    if bad:
        raise InputError(f"{where}.lookups.layers: {bad} out of range; {target.model} has layers 0..{n - 1} and "
                         f"layer 0 has no earlier heads to attribute to, so use 1..{n - 1}")
    return list(layers)


def check(spec, sw, targets, where: str) -> None:
    opt = sw.lookups
    if opt.test_contexts > spec.corpus.heldout_docs:
        raise InputError(f"{where}.lookups.test_contexts: {opt.test_contexts} held-out contexts asked for, the corpus "
                         f"keeps {spec.corpus.heldout_docs} (corpus.heldout_docs); lower one or raise the other")
    if spec.corpus.source != "storyworld":
        if opt.explain_contexts > spec.corpus.n_docs:
            raise InputError(f"{where}.lookups.explain_contexts: {opt.explain_contexts} > corpus.n_docs "
                             f"({spec.corpus.n_docs}); explanation prompts come from the harvested contexts")
        if opt.explainer == "offline":
            raise InputError(f"{where}.lookups.explainer: the offline explainer reads storyworld's planted "
                             f"structure, and corpus.source is {spec.corpus.source!r}; use explainer: llm with an "
                             "llm: section (docs/llm.md)")
        if opt.copy_targets:
            raise InputError(f"{where}.lookups.copy_targets: the copy targets are storyworld's nonce code words; "
                             "turn it off for other corpora")
    if opt.explainer == "llm" and opt.llm.serve is not None:
        _check_serve(opt.llm.serve, f"{where}.lookups.llm.serve")
    for t in targets:
        layers_of(sw, t, where)


def _contexts(spec, tok, opt) -> dict:
    from ..harvest.corpus import corpus_for

    corpus = corpus_for(spec.corpus, tok)
    e = corpus.contexts(0, opt.explain_contexts)
    t = corpus.heldout().slice(0, opt.test_contexts)
    return {"explain_ids": e.ids, "explain_keep": e.keep, "test_ids": t.ids, "test_keep": t.keep, "bos": corpus.bos}


def run(ctx, sw, index: int) -> dict:
    import ray

    from ..models.pool import Item, Load, ModelPool
    from ..run.records import Records
    from .lookups import LookupJob
    from .stage import guard

    spec, target, store = ctx.spec, ctx.target, ctx.store
    opt, where = sw.lookups, f"sweeps[{index}] ({sw.name})"
    storyworld = spec.corpus.source == "storyworld"
    copy = opt.copy_targets if opt.copy_targets is not None else storyworld
    layers = layers_of(sw, target, where)
    guard(store, sw)
    tok = target.ref.tokenizer()
    contexts = _contexts(spec, tok, opt)
    bos = contexts["bos"]
    seed = spec.corpus.seed if storyworld else None
    if storyworld:
        from ..storyworld.vocab import NONCE, VOCAB, WORD_ID

        vocab = (WORD_ID[NONCE[0]], len(VOCAB))       # copying is of nonce words: random sequences of them
    else:
        vocab = None
    folder = f"sweeps/{sw.name}"
    items = lt.items_for(opt, layers, copy)
    done = Records(store / folder, "items")
    todo = [it for it in items if it.id not in done.names()]
    log.info(f"look-ups {sw.name} {target}: {len(items)} items ({len(items) - len(todo)} already done), "
             f"layers {layers}, {opt.n_per_layer} neurons per layer + {opt.n_random} random"
             f"{' + copy targets' if copy else ''}")
    t0 = time.perf_counter()
    by_id = {it.id: it for it in todo}
    if todo:
        res = spec.resources.sweeps

        def on_item(key: str, parts: list) -> None:
            it = by_id[key]
            if it.set == "induction":
                store.write_bytes(f"{folder}/induction/induction.parquet",
                                  to_parquet(lt.induction_table(target.id, parts[0][0])))
                done.put(key, {})
            else:
                result = parts[0]
                for name, tab in lt.item_tables(target.id, result, tok, bos).items():
                    store.write_bytes(f"{folder}/{name}/{key}.parquet", to_parquet(tab))
                done.put(key, {"neurons": len(result), "pairs": sum(len(n["pairs"]) for n in result)})
            bar.advance(1)

        job_args = {"ref": target.ref, "word_level": storyworld}
        ctx_ref = ray.put(contexts)     # one copy in the object store, shared by every item's payload
        with ModelPool(Load.of(target.ref, res), [(0, _n_layers(target))], LookupJob, [job_args],
                       replicas=sw.pipelines, resources=res.ray_options(), max_in_flight=2,
                       name=f"look-ups {sw.name} {target}") as pool:
            with progress(f"look-ups {sw.name} {target}", total=len(todo), unit="item") as bar:
                pool.run([Item(it.id, lambda it=it: iter([(None, lt.payload(opt, it, seed, bos, vocab, ctx_ref), it.id)]))
                          for it in todo], on_item)
    done.consolidate()
    explain(ctx, sw, [it.id for it in items if it.set != "induction"])
    out = summary(store, sw, target)
    out.update(items=len(items), wall_s=round(time.perf_counter() - t0, 2), layers=layers)
    store.write_json(f"{folder}/summary.json", out)
    return out


def explain(ctx, sw, ids: list[str]) -> None:
    """The explaining step over every item whose explanations are not written yet."""
    import io

    import pyarrow.parquet as pq
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..run.records import Records

    store, folder, opt = ctx.store, f"sweeps/{sw.name}", sw.lookups
    rec = Records(store / folder, "explained")
    todo = [i for i in ids if i not in rec.names()]
    if not todo:
        return
    read = lambda t, i: pq.read_table(io.BytesIO(store.read_bytes(f"{folder}/{t}/{i}.parquet"))).to_pylist()  # noqa: E731
    from .lookup_explain import explain_task

    with _endpoint(opt) as (endpoint, here):
        # a server this step started listens on this node's loopback: its tasks run here too
        options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)} if here else {}
        task = ray.remote(num_cpus=0.5, max_retries=2)(explain_task).options(**options)
        log.info(f"look-ups {sw.name} {ctx.target}: explaining {len(todo)} items with {opt.explainer}"
                 f"{' (' + endpoint[0] + ')' if endpoint else ''}")
        _explain_all(store, folder, sw, str(ctx.target), todo, rec, task, endpoint, read)
    rec.consolidate()


def _check_serve(name: str, where: str) -> None:
    from ..modelref import SMOLLM2

    if name != SMOLLM2 and not os.path.isdir(name):
        raise InputError(f"{where}: {name!r} is neither {SMOLLM2} nor a local model folder")


def serve_folder(name: str) -> str:
    from ..modelref import SMOLLM2

    _check_serve(name, "lookups.llm.serve")
    if name == SMOLLM2:
        from ..models.smollm2 import resolve

        return str(resolve())
    return name


@contextlib.contextmanager
def _endpoint(opt):
    """((base_url, model) or None, started here?) for the explaining step; starts ``llm.serve``."""
    if opt.explainer != "llm" or opt.llm.serve is None:
        yield None, False
        return
    from ..interp.serve import serving

    folder = serve_folder(opt.llm.serve)
    log.info(f"starting transformers serve {folder} on 127.0.0.1 for the explaining step")
    with serving(folder) as s:
        yield (s.base_url, s.model_id), True


def _explain_all(store, folder, sw, target: str, todo, rec, task, endpoint, read) -> None:
    import pyarrow as pa
    import ray

    opt = sw.lookups
    pending: dict = {}
    queue = list(todo)
    with progress(f"explain {sw.name} {target}", total=len(todo), unit="item") as bar:
        while queue or pending:
            while queue and len(pending) < sw.pipelines:
                i = queue.pop(0)
                pending[task.remote(read("activating", i), read("pairs", i), opt, endpoint)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            rows, cls = ray.get(ready[0])
            store.write_bytes(f"{folder}/explanations/{i}.parquet",
                              to_parquet(pa.Table.from_pylist(rows, schema=lt.SCHEMAS["explanations"])))
            keep = [f.name for f in lt.SCHEMAS["classifications"]]
            store.write_bytes(f"{folder}/classifications/{i}.parquet", to_parquet(pa.Table.from_pylist(
                [{k: c[k] for k in keep} for c in cls], schema=lt.SCHEMAS["classifications"])))
            for rel, text in lt.delphi_files([r for r in rows if not r["skipped"]], cls).items():
                store.write_bytes(f"{folder}/delphi/{rel}", text.encode())
            rec.put(i, {"pairs": len(rows), "scored": sum(not r["skipped"] for r in rows)})
            bar.advance(1)


_EXPLAINED = ("explanations", "classifications")    # written by the explaining step, recorded apart


def tables(store, sw_name: str, names: tuple[str, ...] = tuple(lt.SCHEMAS)) -> dict:
    """The sweep's tables (``names`` of them), every finished item's rows."""
    return {t: read_table(store, sw_name, t, lt.SCHEMAS[t], records="explained" if t in _EXPLAINED else "items")
            for t in names}


def summary(store, sw, target) -> dict:
    # only what the figures read: the prompts and classifications are the bulk of a sweep's rows
    tabs = tables(store, sw.name, ("neurons", "explanations", "ablation", "induction"))
    n_heads = target.ref.meta_model().config.num_attention_heads
    return {"method": "lookups", "explainer": sw.lookups.explainer,
            "sets": lt.summarize(tabs, sw.lookups.induction_top or n_heads)}

"""The ``dashboards`` stage: feature dashboards for every SAE of one target, computed from its
harvested Parquet and the SAE as Ray tasks (one per SAE to count firings and choose the latents,
then one per SAE and latent batch), written in SAEDashboard's batch layout:

``<target>/dashboards/<hookpoint>/<sae>/selection.json``   the latents shown and their groups
``<target>/dashboards/<hookpoint>/<sae>/batch-<k>.json``   ``{model_id, layer, sae_set, sae_id_suffix,
                                                          hook_point, features: [...]}``

Each batch file is written before its record (``_records/dashboards``, named with a hash of the
settings it was made with): a re-run computes only the batches without a record of the current settings, so
a change in the ``dashboards`` section reuses nothing stale and a crash loses one batch at most.
What a dashboard adds beyond the activations (a planted concept, GradSAE influence) is read from
the evaluate and sweeps stages' outputs when they exist.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np

from ..errors import SaerayError
from ..run.records import Records
from ..run.stages import Result, Stage, TargetContext

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("saeray")


@dataclass
class DashboardsResult(Result):
    saes: dict = field(default_factory=dict)   # hook point -> sae -> {width, latents, tokens, batches: [rel paths]}
    tokens: int = 0                            # harvested tokens the dashboards were computed on (most of any SAE)


def folder(hp: str, sae: str) -> str:
    return f"dashboards/{hp}/{sae}"


def batch_path(hp: str, sae: str, k: int) -> str:
    return f"{folder(hp, sae)}/batch-{k:04d}.json"


def key(spec, target) -> dict:
    from ..train.stage import key as train_key

    d = spec.dashboards.model_dump(mode="json")
    return {**train_key(spec, target), **{f"dashboards.{k}": v for k, v in d.items() if k != "enabled"},
            "dashboards.influence_from": influence_sweeps(spec)}


def influence_sweeps(spec) -> list[str]:
    """The GradSAE sweeps whose scores rank the influential group: a sweep added to a finished run
    changes the dashboards."""
    return [sw.name for sw in spec.sweeps if sw.method == "gradsae"]


def check(spec, targets) -> None:
    return None


def needs_for(spec) -> tuple[str, ...]:
    # the planted concepts come from the evaluation, the influential group from a GradSAE sweep
    return ("train", "evaluate") + (("sweeps",) if spec.sweeps else ())


def load_tokens(target_store, hookpoint: str, limit: int, acts: bool = True):
    """The first ``limit`` harvested rows of a hook point, in corpus order (records' unit order);
    without ``acts``, only their positions (``acts`` is then empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..harvest.reader import ActivationDataset
    from ..harvest.schema import acts_to_numpy
    from .features import Tokens

    ds = ActivationDataset.from_target(target_store, hookpoint, prefetch=0, shuffle_buffer=0)
    parts, n = [], 0
    for rel in ds.files:
        with ds.store.fs.open(ds.store.path(rel), "rb") as f:
            t = pq.read_table(f, columns=["doc", "pos", "token", "act"] if acts else ["doc", "pos", "token"])
        parts.append(t.slice(0, limit - n))
        n += parts[-1].num_rows
        if n >= limit:
            break
    t = pa.concat_tables(parts)
    a = acts_to_numpy(t.column("act")) if acts else np.zeros((t.num_rows, 0), np.float16)
    return Tokens(a, t.column("doc").to_numpy(), t.column("pos").to_numpy(), t.column("token").to_numpy())


def count_task(target_url: str, options: dict, hookpoint: str, limit: int, sae_url: str) -> tuple[np.ndarray, int]:
    """Ray task: firings per latent of one SAE over the dashboard tokens, and how many tokens."""
    import torch

    from ..sae import io as sae_io
    from ..store import Store
    from .features import counts

    torch.set_num_threads(1)
    t = load_tokens(Store(target_url, options), hookpoint, limit)
    return counts(sae_io.load(sae_url, device="cpu"), t.acts), len(t)


def batch_task(target_url: str, options: dict, hookpoint: str, limit: int, sae_url: str, latents: list[int],
               vocab: list[str], W_U, opts: dict, extra: dict, header: dict, context_len: int, labels=None) -> bytes:
    """Ray task: one latent batch's SAEDashboard JSON (bytes)."""
    import torch

    from ..sae import io as sae_io
    from ..spec import DashboardsSpec
    from ..store import Store
    from .features import batch_features

    torch.set_num_threads(1)
    t = load_tokens(Store(target_url, options), hookpoint, limit)
    sae = sae_io.load(sae_url, device="cpu")
    feats = batch_features(sae, t, latents, vocab, W_U, DashboardsSpec(**opts), extra,
                           n_contexts=int(len(np.unique(t.doc))), context_len=context_len, dataset=header["dataset"],
                           labels=labels if labels is None or len(labels[1]) == len(t) else None)
    return json.dumps({**header, "features": feats}, ensure_ascii=False).encode()


# ---- what the other stages know about a latent ---------------------------------------------------

def concept_latents(evaluation: dict, hp: str, sae: str) -> dict[int, list[dict]]:
    """latent -> the planted concepts it is the best single latent for (``evaluation``: the
    target's eval.json, or {} without one)."""
    ev = evaluation.get("saes", {}).get(hp, {}).get(sae, {})
    out: dict[int, list[dict]] = {}
    for name, c in (ev.get("concepts") or {}).items():
        out.setdefault(int(c["latent"]), []).append({"concept": name, "f1": round(c["f1"], 4),
                                                     "auroc": round(c["auroc"], 4)})
    return out


def gradsae_latents(store, sweeps: list[str]) -> list[tuple[str, "pd.DataFrame"]]:
    """(sweep name, its latents table) of each of the GradSAE ``sweeps`` the target has, read once
    per stage."""
    from ..sweeps.grid import read_table

    return [(name, read_table(store, name, "latents").to_pandas()) for name in sweeps
            if store.exists(f"sweeps/{name}")]


def influence(tables: list[tuple[str, "pd.DataFrame"]], hp: str, sae: str) -> dict[int, dict]:
    """latent -> mean |GradSAE| and mean |exact effect| over every prompt of the first GradSAE sweep
    (of ``tables``, :func:`gradsae_latents`) that scored this SAE (zero where the latent was
    inactive); empty when none covered it."""
    out: dict[int, dict] = {}
    for name, t in tables:
        t = t[(t.hookpoint == hp) & (t.sae == sae)]
        if not len(t):
            continue
        n = t.prompt_id.nunique()
        g = t.assign(g=t.gradsae.abs(), e=t.exact.abs()).groupby("latent")[["g", "e"]].sum() / n
        ranked = g.g.rank(ascending=False, method="min")
        for lat, row in g.iterrows():
            out[int(lat)] = {"sweep": name, "gradsae": float(f"{row.g:.4g}"), "exact": float(f"{row.e:.4g}"),
                             "rank": int(ranked[lat]), "prompts": int(n)}
        break
    return out


# ---- the stage ----------------------------------------------------------------------------------

def _hash(opts: dict) -> str:
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:12]


def _vocab(tok) -> list[str]:
    """Every token id's text as it reads in a context: a word-level tokenizer (storyworld's) joins
    tokens with spaces when decoding, so its tokens get the leading space a BPE token carries."""
    words = [tok.decode([i]) for i in range(len(tok))]
    a, b = _two_words(words)
    if a is not None and tok.decode([a, b]) == f"{words[a]} {words[b]}":
        words = [" " + w for w in words]
    return words


def _two_words(words: list[str]) -> tuple[int | None, int | None]:
    found = [i for i, w in enumerate(words) if w.isalpha()][:2]
    return (found[0], found[1]) if len(found) == 2 else (None, None)


def _labels(spec, store, hp: str, limit: int):
    """Storyworld's planted labels of the dashboard rows (every hook point harvests the same rows),
    which explain each latent; None on other corpora."""
    if spec.corpus.source != "storyworld":
        return None
    from .explain import planted_labels

    t = load_tokens(store, hp, limit, acts=False)
    try:
        return planted_labels(t.doc, t.pos, spec.corpus.seed)
    except ValueError as e:
        log.warning(f"dashboards: no planted-label explanations ({e})")
        return None


def _model_id(target) -> str:
    return target.model if target.revision == "main" else f"{target.model}-{target.revision}"


def run(ctx: TargetContext, inputs: dict) -> DashboardsResult:
    import ray

    from ..harvest.stage import plan
    from ..models.hookpoints import parse
    from ..models.shard import read_unembedding
    from ..progress import progress

    spec, target, store = ctx.spec, ctx.target, ctx.store
    opts = spec.dashboards
    od = opts.model_dump(mode="json")
    h = _hash({**od, "influence_from": influence_sweeps(spec)})
    saes = inputs["train"].saes
    hps = [hp for hp in plan(spec, target).hookpoints if hp in saes]
    limit = opts.tokens
    records = Records(store, "dashboards")
    # a unit's name carries the settings' hash: records are written once, and a batch made with
    # other settings (an earlier run of this stage) must not count as done
    done = records.names()
    res = spec.resources.eval
    task_opts = res.task_options()
    url = lambda rel: store.url_of(rel)  # noqa: E731
    todo_saes = [(hp, name) for hp in hps for name in saes[hp]]
    out: dict = {}

    # 1. which latents: from a firing count per SAE (cached in selection.json with the settings' hash)
    selections: dict[tuple, dict] = {}
    pending = {}
    counter = ray.remote(count_task).options(**task_opts)
    for hp, name in todo_saes:
        rel = f"{folder(hp, name)}/selection.json"
        sel = store.read_json(rel) if store.exists(rel) else {}
        if sel.get("hash") == h:
            selections[(hp, name)] = sel
        else:
            pending[counter.remote(store.url, store.options, hp, limit, url(saes[hp][name]["path"]))] = (hp, name)
    from .select import select

    tables = gradsae_latents(store, influence_sweeps(spec))
    evaluation = store.read_json("eval.json") if store.exists("eval.json") else {}
    infl_of = {(hp, name): influence(tables, hp, name) for hp, name in todo_saes}
    conc_of = {(hp, name): concept_latents(evaluation, hp, name) for hp, name in todo_saes}
    with progress(f"dashboards {target}: choosing latents (firing counts)", total=len(pending), unit="SAE") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            hp, name = pending.pop(ready[0])
            c, n = ray.get(ready[0])
            infl = {i: v["gradsae"] for i, v in infl_of[(hp, name)].items()}
            groups = select(c, opts, infl, list(conc_of[(hp, name)]))
            sel = {"hash": h, "tokens": int(n), "width": len(c), "counts": c.tolist(),
                   "latents": list(groups), "groups": {str(k): v for k, v in groups.items()}}
            store.write_json(f"{folder(hp, name)}/selection.json", sel)
            selections[(hp, name)] = sel
            bar.advance(1)

    # 2. one task per SAE and latent batch
    items = []
    for hp, name in todo_saes:
        lat = selections[(hp, name)]["latents"]
        B = opts.batch_latents
        batches = [lat[i:i + B] for i in range(0, len(lat), B)]
        out.setdefault(hp, {})[name] = {"width": selections[(hp, name)]["width"], "latents": len(lat),
                                        "tokens": selections[(hp, name)]["tokens"],
                                        "batches": [batch_path(hp, name, k) for k in range(len(batches))]}
        for k, b in enumerate(batches):
            if f"{hp}@{name}@{k:04d}@{h}" not in done:
                items.append((hp, name, k, b))
    log.info(f"dashboards {target}: {len(items)} latent batches to compute "
             f"({sum(len(v) for v in out.values())} SAEs)")
    if items:
        tok = target.ref.tokenizer()
        vocab_ref = ray.put(_vocab(tok))
        try:
            W_U = read_unembedding(target.ref)
        except Exception as e:  # noqa: BLE001 - a dashboard without its logit lens beats none
            log.warning(f"dashboards {target}: no logit lens ({e})")
            W_U = None
        wu_ref = ray.put(W_U)
        labels_ref = ray.put(_labels(spec, store, items[0][0], limit))
        task = ray.remote(batch_task).options(**task_opts)
        pending = {}
        items_of = {(hp, name, k): b for hp, name, k, b in items}
        for hp, name, k, b in items:
            sel = selections[(hp, name)]
            conc, infl = conc_of[(hp, name)], infl_of[(hp, name)]
            extra = {i: {"groups": sel["groups"][str(i)], **({"concepts": conc[i]} if i in conc else {}),
                         **({"influence": infl[i]} if i in infl else {})} for i in b}
            p = parse(hp)
            header = {"model_id": _model_id(target), "layer": p.layer, "sae_set": f"{p.kind}-{name}".replace(".", "-"),
                      "sae_id_suffix": None if p.head is None else f"h{p.head}", "hook_point": hp, "sae": name, "target": target.id,
                      "dataset": spec.corpus.source}
            ref = task.remote(store.url, store.options, hp, limit, url(saes[hp][name]["path"]), b, vocab_ref, wu_ref,
                              od, extra, header, spec.corpus.context_len, labels_ref)
            pending[ref] = (hp, name, k)
        with progress(f"dashboards {target}", total=len(pending), unit="batch") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                hp, name, k = pending.pop(ready[0])
                store.write_bytes(batch_path(hp, name, k), ray.get(ready[0]))
                records.put(f"{hp}@{name}@{k:04d}@{h}", {"hash": h, "latents": len(items_of[(hp, name, k)])})
                bar.advance(1)
        records.consolidate()
    missing = [p for v in out.values() for d in v.values() for p in d["batches"] if not store.exists(p)]
    if missing:
        raise SaerayError(f"dashboards {target}: batch files missing: {', '.join(missing[:5])}")
    return DashboardsResult(out, max((d["tokens"] for v in out.values() for d in v.values()), default=0))


STAGE = Stage("dashboards", needs=("train", "evaluate"), key=key, check=check, run=run, result=DashboardsResult,
              incremental=True, needs_for=needs_for)

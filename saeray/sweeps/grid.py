"""The sweep grid: work items, their results written once as Parquet, resume, and the figures the
report shows. The only place that knows how a sweep is spread over the cluster.

An item is (hook point, SAE, prompt set, shard of ``prompts_per_item`` prompts) of one sweep of one
target; every experiment of the sweep runs in it (they share the clean pass and the scores). Its
results are four tables, each one Parquet file named after the item::

    <target>/sweeps/<sweep>/prompts/<item>.parquet    one row per prompt (correct or not)
    <target>/sweeps/<sweep>/latents/<item>.parquet    one row per (prompt, active latent)
    <target>/sweeps/<sweep>/masking/<item>.parquet    one row per (prompt, method, side, K)
    <target>/sweeps/<sweep>/steering/<item>.parquet   one row per (prompt, method, side, K)
    <target>/sweeps/<sweep>/_records/items/<item>.json   written last: the item is finished

Files are written atomically under deterministic names, and the record after all of them, so a
killed item is redone and overwrites its own files: no row is lost or duplicated. Each folder is one
Arrow dataset (``pyarrow.dataset.dataset(folder)``, DuckDB ``read_parquet('.../*.parquet')``);
schemas in docs/store.md.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .agreement import nanmean, nanmedian
from .answers import exact_match, token_f1
from .job import SCORES

TABLES = ("prompts", "latents", "masking", "steering")
_KEY = [("target", pa.string()), ("hookpoint", pa.string()), ("sae", pa.string()), ("prompt_set", pa.string()),
        ("prompt_id", pa.string())]
_AGREE = [(f"{m}_{s}", pa.float64()) for s in ("spearman", "pearson", "topk_overlap") for m in SCORES]
SCHEMAS = {
    "prompts": pa.schema(_KEY + [("answer", pa.string()), ("prediction", pa.string()), ("correct", pa.bool_()),
                                 ("n_tokens", pa.int32()), ("n_active", pa.int32()), ("n_active_last", pa.int32()),
                                 ("p_model", pa.float64()), ("y_splice", pa.float64()), ("y_base", pa.float64()),
                                 ("t_gradsae_s", pa.float64()), ("t_ig_s", pa.float64()), ("t_exact_s", pa.float64())]
                       + _AGREE),
    "latents": pa.schema(_KEY + [("latent", pa.int32()), ("act_last", pa.float32()), ("exact", pa.float32())]
                         + [(m, pa.float32()) for m in SCORES]),
    "masking": pa.schema(_KEY + [("method", pa.string()), ("side", pa.string()), ("k", pa.string()), ("k_n", pa.int32()),
                                 ("answer", pa.string()), ("prediction", pa.string()), ("em", pa.float32()),
                                 ("f1", pa.float32())]),
    "steering": pa.schema(_KEY + [("method", pa.string()), ("side", pa.string()), ("k", pa.string()), ("k_n", pa.int32()),
                                  ("partner_id", pa.string()), ("answer", pa.string()), ("prediction", pa.string()),
                                  ("em", pa.float32()), ("f1", pa.float32()), ("em_own", pa.float32())]),
}


@dataclass(frozen=True)
class WorkItem:
    sweep: str
    hookpoint: str
    sae: str
    prompt_set: str
    shard: int
    prompt_ids: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.hookpoint}@{self.sae}@{self.prompt_set}@{self.shard:04d}"


def items_for(sweep, sets: dict, hookpoints: list[str], saes: dict[str, list[str]]) -> list[WorkItem]:
    """Every item of one sweep of one target: hook point × SAE × prompt set × shard."""
    out = []
    for hp in hookpoints:
        for sae in saes[hp]:
            for name, ps in sets.items():
                ids = [p.id for p in ps.prompts]
                for s, a in enumerate(range(0, len(ids), sweep.prompts_per_item)):
                    out.append(WorkItem(sweep.name, hp, sae, name, s, tuple(ids[a:a + sweep.prompts_per_item])))
    return out


def payload(sweep, item: WorkItem, ps) -> dict:
    by_id = ps.by_id()
    prompts = [asdict(by_id[i]) for i in item.prompt_ids]
    partners = {p["partner"]: asdict(by_id[p["partner"]]) for p in prompts if p["partner"]}
    return {"hookpoint": item.hookpoint, "sae": item.sae, "prompts": prompts, "partners": partners,
            "experiments": list(sweep.experiments), "ks": list(sweep.ks), "options": sweep.gradsae.model_dump(),
            "exact_batch": sweep.exact_batch, "topk": sweep.topk}


def tables(target: str, item: WorkItem, ps, results: list[dict], tok) -> dict[str, pa.Table]:
    """The item's four tables from the worker's per-prompt results (answers decoded and scored here)."""
    by_id = ps.by_id()
    key = {"target": target, "hookpoint": item.hookpoint, "sae": item.sae, "prompt_set": item.prompt_set}
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    text = lambda toks: tok.decode(toks, skip_special_tokens=True).strip()   # noqa: E731
    for r in results:
        p = by_id[r["id"]]
        k = {**key, "prompt_id": p.id}
        pr = {**k, "answer": p.answer, "prediction": text(r["pred"]), "correct": r["correct"], "n_tokens": r["n_tokens"]}
        for f in ("n_active", "n_active_last", "p_model", "y_splice", "y_base", "t_gradsae_s", "t_ig_s", "t_exact_s"):
            pr[f] = r.get(f)
        for m, a in r.get("agreement", {}).items():
            for s, v in a.items():
                pr[f"{m}_{s}"] = v
        rows["prompts"].append(pr)
        if "latents" in r:
            lat = r["latents"]
            n = len(lat["latent"])
            cols = {c: lat[c].tolist() for c in lat}
            rows["latents"].extend({**k, **{c: cols[c][i] for c in cols}} for i in range(n))
        def scored(m: dict, answer: str) -> dict:
            pred = text(m["tokens"])
            return {**k, **{f: m[f] for f in ("method", "side", "k", "k_n")}, "answer": answer, "prediction": pred,
                    "em": exact_match(pred, answer), "f1": token_f1(pred, answer)}

        rows["masking"].extend(scored(m, p.answer) for m in r.get("masking", []))
        if r.get("steering"):
            q = by_id[p.partner]
            for m in r["steering"]:
                row = scored(m, q.answer)
                rows["steering"].append({**row, "partner_id": q.id, "em_own": exact_match(row["prediction"], p.answer)})
    return {t: pa.Table.from_pylist(rows[t], schema=SCHEMAS[t]) for t in TABLES}


def to_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_table(store, sweep: str, table: str, schema: pa.Schema | None = None, records: str = "items") -> pa.Table:
    """Every finished item's rows of one table of one sweep of one target (finished: recorded in
    ``_records/<records>``)."""
    from ..run.records import Records

    done = Records(store / f"sweeps/{sweep}", records).names()
    parts = [pq.read_table(io.BytesIO(store.read_bytes(f"sweeps/{sweep}/{table}/{i}.parquet"))) for i in sorted(done)
             if store.exists(f"sweeps/{sweep}/{table}/{i}.parquet")]
    return pa.concat_tables(parts) if parts else (schema or SCHEMAS[table]).empty_table()


# ---- figures for the report ---------------------------------------------------------------------

def _groups(rows: list[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[f] for f in fields), []).append(r)
    return out


def summarize(store, sweep: str) -> dict:
    """Per (hook point, SAE, prompt set): prompts kept, agreement (median Spearman and Pearson, mean
    top-k overlap per score), latents scored per second; the masking and steering tables (EM and F1
    in %, per method, side and K)."""
    prompts = read_table(store, sweep, "prompts").to_pylist()
    out: dict = {"agreement": [], "masking": [], "steering": []}
    for (hp, sae, ps), rows in _groups(prompts, ("hookpoint", "sae", "prompt_set")).items():
        ok = [r for r in rows if r["correct"]]
        row = {"hookpoint": hp, "sae": sae, "prompt_set": ps, "prompts": len(rows), "correct": len(ok),
               "n_active": nanmean([r["n_active"] for r in ok])}
        for m in SCORES:
            row[f"{m}_spearman"] = nanmedian([r[f"{m}_spearman"] for r in ok])
            row[f"{m}_pearson"] = nanmedian([r[f"{m}_pearson"] for r in ok])
            row[f"{m}_topk_overlap"] = nanmean([r[f"{m}_topk_overlap"] for r in ok])
        lat = sum(r["n_active"] or 0 for r in ok)
        for m in ("gradsae", "ig", "exact"):
            t = sum(r[f"t_{m}_s"] or 0 for r in ok)
            row[f"{m}_latents_per_s"] = lat / t if t > 0 else math.nan
        out["agreement"].append(row)
    for table in ("masking", "steering"):
        rows = read_table(store, sweep, table).to_pylist()
        for key, g in _groups(rows, ("hookpoint", "sae", "prompt_set", "method", "side", "k")).items():
            d = dict(zip(("hookpoint", "sae", "prompt_set", "method", "side", "k"), key))
            d.update(n=len(g), em=100 * nanmean([r["em"] for r in g]), f1=100 * nanmean([r["f1"] for r in g]),
                     k_n=nanmean([r["k_n"] for r in g]))
            if table == "steering":
                d["em_own"] = 100 * nanmean([r["em_own"] for r in g])
            out[table].append(d)
    return out

"""``<run>/report/index.html``: one self-contained page (plots inlined as PNG data URIs) with the
SAE table, the trade-off plots and, on storyworld runs, the best latent per planted concept.

Every string that came from a model, a spec or a file (hook point names, concept names, paths) is
escaped with :func:`html.escape`; nothing user-controlled is ever inserted as markup."""
from __future__ import annotations

import base64
import html
import logging
from typing import Callable

from ..evaluate.concepts import F1_FOUND
from .markup import fmt, table
from .plots import tradeoff_png
from .emergence import render_html as render_emergence
from .sweeps import render_html as render_sweeps

log = logging.getLogger("saeray")

COLUMNS = (("target", "target"), ("hookpoint", "hook point"), ("arch", "arch"), ("width", "width"), ("k", "k"), ("l1", "l1"),
           ("l0", "L0"), ("fvu", "FVU"), ("ce_loss_recovered", "CE recovered"), ("kl", "KL"),
           ("dead_frac", "dead"), (f"concepts_f1_{F1_FOUND}", f"concepts F1≥{F1_FOUND}"),
           ("mean_best_f1", "mean best F1"))

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left;white-space:nowrap}img{max-width:100%;margin:0.5em 0}.muted{color:#777}
td.w{text-align:left;white-space:normal}th.l,th.w{text-align:left}table.lk{width:100%}table.lk th.w{width:62%}
mark{background:#ffe08a;padding:0 2px}p.lk{margin:1.6em 0 0}p.lk+table{margin-top:0.4em}"""


def _fmt(v) -> str:
    return fmt(v, 4)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    return table(header, rows, _fmt, left)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(summary: dict, eval_details: dict[str, dict] | None = None,
           sweep_tables: Callable[[str, str], dict | None] | None = None,
           emergence: tuple[dict, dict[str, bytes]] | None = None) -> tuple[str, dict[str, bytes]]:
    """The page and the PNGs (also written next to it, for people who want the files).
    ``sweep_tables(target id, sweep name)``: a sweep's tables for the sections that show rows
    (look-ups), or None; see :func:`tables_reader`."""
    rows = summary["saes"]
    pngs = {}
    p1 = tradeoff_png(rows, "fvu", "FVU (1 − explained variance)", "Sparsity vs reconstruction")
    p2 = tradeoff_png(rows, "ce_loss_recovered", "CE loss recovered", "Sparsity vs downstream fidelity")
    if p1:
        pngs["l0_vs_fvu.png"] = p1
    if p2:
        pngs["l0_vs_ce_loss_recovered.png"] = p2
    # one target: its model and revision are in the Targets table, not repeated on every row; columns
    # no SAE has a value for (concept scores on a corpus without planted labels) are left out
    cols = [c for c in COLUMNS if (c[0] != "target" or len(summary.get("targets", [])) > 1)
            and any(r.get(c[0]) is not None for r in rows)]
    left = sum(1 for c in cols if c[0] in ("target", "hookpoint", "arch"))
    parts = [f"<!doctype html><meta charset=utf-8><title>saeray audit: {html.escape(summary['run'])}</title>",
             f"<style>{CSS}</style>", f"<h1>saeray audit: {html.escape(summary['run'])}</h1>",
             "<h2>Targets</h2>",
             _table(["model", "revision", "harvested tokens per hook point", "clean held-out loss"],
                    [[t["model"], t["revision"], t.get("harvest_rows"), t.get("loss_clean")]
                     for t in summary.get("targets", [])], left=2),
             "<h2>Stage times (s)</h2>",
             _table(["target", "harvest", "train", "evaluate", "presence", "sweeps"],
                    [[tid, *(w.get(s) for s in ("harvest", "train", "evaluate", "presence", "sweeps"))]
                     for tid, w in summary.get("stage_wall_s", {}).items() if isinstance(w, dict)]),
             "<h2>SAEs</h2>",
             _table([c[1] for c in cols], [[r.get(k) for k, _ in cols] for r in rows], left=left),
             "<p class=muted>L0, FVU, dead: on held-out tokens. CE recovered = (L_zero − L_sae)/(L_zero − L_clean), "
             "zero-ablation reference. KL: mean per-token KL(clean ‖ spliced).</p>",
             "<h2>Trade-offs</h2>", _img(p1, "L0 vs FVU"), _img(p2, "L0 vs CE loss recovered")]
    for tid, detail in (eval_details or {}).items():
        if not detail.get("concept_names"):
            continue
        names = detail["concept_names"]
        parts.append(f"<h2>Planted concepts in {html.escape(tid)}: best single latent (F1 / AUROC)</h2>")
        header = ["concept"]
        cols = []
        for hp, d in detail["saes"].items():
            for n, r in d.items():
                if "concepts" in r:
                    header.append(f"{hp} {n}")
                    cols.append(r["concepts"])
        table_rows = [[c] + [f"{col[c]['f1']:.2f} / {col[c]['auroc']:.2f}" if c in col else None for col in cols]
                      for c in names]
        parts.append(_table(header, table_rows))
    if emergence is not None:
        parts.append(render_emergence(*emergence))
    for tid, sw in summary.get("sweeps", {}).items():
        parts.append(render_sweeps(tid, sw, sweep_tables))
    parts.append("<p class=muted>Files: summary.json (this table); targets/&lt;model&gt;@&lt;revision&gt;/eval.json "
                 "(per-concept detail).</p>")
    return "\n".join(parts), pngs


def tables_reader(run, summary: dict) -> Callable[[str, str], dict | None]:
    """(target id, sweep name) -> that look-up sweep's tables read from the run folder ``run`` (a
    Store), or None when they cannot be read (the section then shows its figures only)."""
    folders = {t["target"]: t["folder"] for t in summary.get("targets", [])}

    def read(tid: str, name: str) -> dict | None:
        from ..sweeps.lookup_run import tables

        if tid not in folders:
            return None
        try:
            return tables(run / folders[tid], name)
        except Exception as e:  # noqa: BLE001 - a report with the figures beats no report
            log.warning(f"report: the tables of sweep {name} in {tid} could not be read ({e}); figures only")
            return None
    return read


def report_stage(rc) -> dict:
    """The run-level report over every target (always rebuilt: cheap, and reflects the manifest)."""
    from .summary import build_summary

    run = rc.store
    summary = build_summary(rc.manifest.data, run.url)
    details = {}
    for t in summary["targets"]:
        rel = f"{t['folder']}/eval.json"
        if run.exists(rel):
            details[t["target"]] = run.read_json(rel)
    emergence = None
    if run.exists("emergence/summary.json"):
        es = run.read_json("emergence/summary.json")
        emergence = (es, {n: run.read_bytes(f"emergence/{n}") for n in es.get("figures", [])})
    page, pngs = render(summary, details, tables_reader(run, summary), emergence)
    for name, data in pngs.items():
        run.write_bytes(f"report/{name}", data)
    run.write_bytes("report/index.html", page.encode())
    run.write_json("report/summary.json", summary)
    return {"saes": len(summary["saes"]), "plots": sorted(pngs)}

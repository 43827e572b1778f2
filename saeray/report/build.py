"""The whole report of a run, rebuilt from the store alone (the manifest and the files the stages
wrote), so ``saeray report RUN_URL`` can rebuild it at any time:

``report/index.html``                               overview (:mod:`.overview`)
``report/concepts.html``                            planted-concept recovery (storyworld runs)
``report/sweep-<name>.html``                        one page per sweep, every target
``report/emergence.html``                           emergence across checkpoints, layers and sizes
``report/dashboards/<target>/<hookpoint>/<sae>.html`` feature dashboards (:mod:`.dashboards`)
``report/assets/``                                  the stylesheet and scripts (no CDN)
``report/summary.json``, ``report/*.png``           the SAE table and the plots as files

Every string that came from a model, a spec or a file is escaped (:mod:`.markup`) or, on the
dashboards, put on the page as text by the script; nothing user-controlled is inserted as markup."""
from __future__ import annotations

import html
import logging
import time
from typing import Callable

from ..evaluate.concepts import F1_FOUND
from .markup import fmt, img, link, table
from .page import NavLink, asset_files, page

log = logging.getLogger("saeray")


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


def _target_folder(t: dict) -> str:
    return t["folder"].split("/", 1)[1] if t["folder"].startswith("targets/") else t["folder"]


def _latent_link(dash: dict) -> Callable[[str, str, str, int], str | None]:
    """(target, hook point, sae, latent) -> the dashboard href of that latent when it is shown."""
    def get(tid: str, hp: str, sae: str, latent: int) -> str | None:
        d = dash.get((tid, hp, sae))
        return f"{d['href']}#{int(latent)}" if d and int(latent) in d["shown"] else None
    return get


def _eval_concepts_html(details: dict[str, dict], latent_link) -> str:
    """The evaluate stage's best single latent per concept (F1 and AUROC), one table per hook point."""
    parts = []
    for tid, d in details.items():
        names = d.get("concept_names") or []
        for hp, saes in d.get("saes", {}).items():
            cols = [(n, r["concepts"]) for n, r in saes.items() if "concepts" in r]
            if not names or not cols:
                continue
            rows = []
            for c in names:
                row = [c]
                for n, col in cols:
                    if c not in col:
                        row.append(None)
                        continue
                    v = col[c]
                    text = f"#{v['latent']}: {v['f1']:.2f} / {v['auroc']:.2f}"
                    h = latent_link(tid, hp, n, v["latent"])
                    row.append(link(h, text) if h else text)
                rows.append(row)
            parts.append(f"<h3>{html.escape(tid)} · {html.escape(hp)}: best single latent by F1 (F1 / AUROC)</h3>")
            parts.append(table(["concept"] + [n for n, _ in cols], rows, lambda v: fmt(v, 3), sortable=True))
    return "\n".join(parts)


def build_report(run, manifest_data: dict) -> dict:
    """Write every page of the report of the run folder ``run`` (a Store); returns what was written."""
    from . import dashboards as dash_page
    from .emergence import render_html as render_emergence
    from .overview import render as render_overview
    from .plots import gradsae_scatter_png, tradeoff_png
    from .summary import build_summary
    from .sweeps import render_html as render_sweeps

    t0 = time.perf_counter()
    summary = build_summary(manifest_data, run.url)
    name = summary["run"]
    targets = {t["target"]: t for t in summary.get("targets", [])}
    out_pages: dict[str, bytes] = {}

    # which latents each dashboard shows first (its selection.json): every other page links into
    # them; the dashboards themselves are rendered one SAE at a time at the end
    from ..dashboards.stage import folder as dash_folder

    dashboards, dash_index = [], {}
    for tid, t in manifest_data.get("targets", {}).items():
        res = (t.get("stages", {}).get("dashboards") or {})
        if res.get("status") != "done":
            continue
        store = run / t["folder"]
        for hp, saes in res["result"]["saes"].items():
            for sae, d in saes.items():
                groups = store.read_json(f"{dash_folder(hp, sae)}/selection.json")["groups"]
                h = dash_page.href(_target_folder(t), hp, sae)
                dashboards.append({"target": tid, "hookpoint": hp, "sae": sae, "latents": len(groups),
                                   "width": d["width"], "groups": dash_page.groups_line(groups.values()), "href": h,
                                   "store": store, "batches": d["batches"],
                                   "tokens": d.get("tokens", res["result"].get("tokens"))})
                dash_index[(tid, hp, sae)] = {"href": h, "shown": {int(i) for i in groups}}
    latent_link = _latent_link(dash_index)

    sections: list[tuple[str, str, str]] = []
    bodies: dict[str, tuple[str, str]] = {}       # href -> (title, body)
    details = {tid: run.read_json(f"{t['folder']}/eval.json") for tid, t in targets.items()
               if run.exists(f"{t['folder']}/eval.json")}
    concepts_body = _concepts_body(run, summary, details, latent_link)
    if concepts_body:
        sections.append(("concepts.html", "Planted concepts", "each concept's best latent and k-sparse probe per SAE "
                         "beside a linear probe on the same activations"))
        bodies["concepts.html"] = ("Planted concepts", concepts_body)
    sweep_names = list(dict.fromkeys(n for sw in summary.get("sweeps", {}).values() for n in sw))
    reader = tables_reader(run, summary)
    for sname in sweep_names:
        parts, method = [], "gradsae"
        for tid, sw in summary["sweeps"].items():
            if sname not in sw:
                continue
            method = sw[sname].get("method", "gradsae")
            parts.append(render_sweeps(tid, {sname: sw[sname]}, reader))
            if method != "lookups":
                png = gradsae_scatter_png(_gradsae_latents(run, targets[tid], sname))
                if png:
                    parts.insert(len(parts) - 1, f"<h3>Score against exact effect: {html.escape(tid)}</h3>"
                                 + img(png, "GradSAE score against exact ablation effect")
                                 + "<p class=muted>One point per (prompt, active latent): |GradSAE score| against "
                                   "|exact effect of zeroing the latent|, log scales.</p>")
        href = f"sweep-{sname}.html"
        line = ("context look-ups: neurons, prompts, heads, explanations and their scores" if method == "lookups"
                else "GradSAE against exact ablation: agreement, masking and steering")
        sections.append((href, f"Sweep {sname}", line))
        bodies[href] = (f"Sweep {sname}", f"<h1>Sweep {html.escape(sname)}</h1>" + "\n".join(parts))
    if run.exists("emergence/summary.json"):
        es = run.read_json("emergence/summary.json")
        pngs = {n: run.read_bytes(f"emergence/{n}") for n in es.get("figures", [])}
        sections.append(("emergence.html", "Emergence", "when and where concepts appear across checkpoints, layers "
                         "and sizes"))
        bodies["emergence.html"] = ("Emergence", render_emergence(es, pngs))

    if run.exists("diff/previous.json"):
        from .diff import render as render_diff

        d = run.read_json("diff/previous.json")
        n = len(d.get("alerts") or [])
        sections.insert(0, ("diff.html", "Changes", f"since the previous run, {d['a']['run']}: "
                            + (f"{n} alert{'s' * (n != 1)}" if n else "no alert") + "; metric deltas, features "
                            "matched, concepts and influential latents lost and gained"))
        bodies["diff.html"] = ("Changes", render_diff(d, latent_link))
    nav = [NavLink("index.html", "Overview")] + [NavLink(h, t) for h, t, _ in sections]
    for href, (title, body) in bodies.items():
        out_pages[href] = page(f"{title} — {name}", body, name, nav, here=href).encode()
    n_bytes = 0
    for d in dashboards:
        store = d.pop("store")
        feats = [f for rel in d.pop("batches") for f in store.read_json(rel)["features"]]
        html_page, js = dash_page.render(name, nav, d["target"], d["hookpoint"], d["sae"], d["width"],
                                         d["tokens"] or 0, feats)
        run.write_bytes(f"report/{d['href']}", html_page.encode())
        run.write_bytes(f"report/{d['href'][:-len('.html')]}.js", js)
        n_bytes += len(html_page.encode()) + len(js)

    rows = summary["saes"]
    pngs = {}
    for fname, y, label, title in (("l0_vs_fvu.png", "fvu", "FVU (1 − explained variance)", "Sparsity vs reconstruction"),
                                   ("l0_vs_ce_loss_recovered.png", "ce_loss_recovered", "CE loss recovered",
                                    "Sparsity vs downstream fidelity")):
        p = tradeoff_png(rows, y, label, title)
        if p:
            pngs[fname] = p
    for n, data in asset_files().items():
        out_pages[f"assets/{n}"] = data
    for n, data in pngs.items():
        out_pages[n] = data
    report_s = round(time.perf_counter() - t0, 2)
    overview = render_overview(summary, pngs, sections, dashboards, report_s)
    out_pages["index.html"] = page(f"saeray audit: {name}", overview, name, nav, here="index.html").encode()
    for rel, data in out_pages.items():
        run.write_bytes(f"report/{rel}", data)
    run.write_json("report/summary.json", summary)
    return {"saes": len(rows), "pages": len(dashboards) + sum(1 for r in out_pages if r.endswith(".html")),
            "dashboards": len(dashboards), "bytes": n_bytes + sum(len(v) for v in out_pages.values()),
            "plots": sorted(pngs)}


def _gradsae_latents(run, t: dict, sweep: str) -> list[dict]:
    from ..sweeps.grid import read_table

    try:
        tab = read_table(run / t["folder"], sweep, "latents")
    except Exception as e:  # noqa: BLE001 - the tables beat no page
        log.warning(f"report: the latents table of sweep {sweep} in {t['target']} could not be read ({e})")
        return []
    return tab.select(["hookpoint", "sae", "gradsae", "exact"]).to_pylist()


def _concepts_body(run, summary: dict, details: dict, latent_link) -> str:
    from .concepts import read_tables, render_html

    parts = []
    tabs = read_tables(run, summary)
    if tabs:
        parts.append(render_html(tabs, latent_link))
    ev = _eval_concepts_html(details, latent_link)
    if ev:
        parts.append("<h2>Best single latent by F1 (evaluate stage)</h2><p class=muted>Per SAE, the latent whose "
                     f"firing best predicts the concept on held-out tokens (F1; found at F1 ≥ {F1_FOUND}) and its "
                     "AUROC. The latent number links to its dashboard when it is shown there.</p>" + ev)
    if not parts:
        return ""
    return "<h1>Planted concepts</h1>" + "\n".join(parts)


def report_stage(rc) -> dict:
    """The run-level report over every target (always rebuilt: cheap, and reflects the manifest)."""
    return build_report(rc.store, rc.manifest.data)

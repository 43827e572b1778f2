"""``report/index.html``: the run at a glance. Targets, stage times (every stage, the run-level
analysis and the report's own), every SAE with its metrics in a sortable table with a link to its
feature dashboard, the trade-off plots, and links to every method's page."""
from __future__ import annotations

import html

from ..evaluate.concepts import F1_FOUND
from .markup import Html, fmt, img, link, table

COLUMNS = (("target", "target"), ("hookpoint", "hook point"), ("arch", "arch"), ("width", "width"), ("k", "k"),
           ("l1", "l1"), ("opts", "options"), ("l0", "L0"), ("fvu", "FVU"), ("ce_loss_recovered", "CE recovered"), ("kl", "KL"),
           ("dead_frac", "dead"), (f"concepts_f1_{F1_FOUND}", f"concepts F1≥{F1_FOUND}"),
           ("mean_best_f1", "mean best F1"))


def _fmt(v) -> str:
    return fmt(v, 4)


def stage_tables(summary: dict, report_s: float | None) -> str:
    walls = summary.get("stage_wall_s", {})
    per = {tid: w for tid, w in walls.items() if isinstance(w, dict)}
    from ..run.stages import registry

    cols = [s for s in registry() if any(w.get(s) is not None for w in per.values())]
    out = table(["target"] + cols, [[tid] + [w.get(s) for s in cols] for tid, w in per.items()], _fmt, sortable=True)
    run_rows = [[n, walls.get(n)] for n in ("emergence",) if walls.get(n) is not None]
    run_rows.append(["report (this page and every other)", report_s])
    out += table(["run-level step", "wall (s)"], run_rows, _fmt)
    return out + ("<p class=muted>Wall time of each stage while it ran; targets run side by side, so a stage's time "
                  "includes waiting for the cluster's CPUs and GPUs the other targets hold.</p>")


def render(summary: dict, pngs: dict[str, bytes], sections: list[tuple[str, str, str]],
           dashboards: list[dict], report_s: float | None = None) -> str:
    """The page body. ``sections``: (href, title, one line) per method page; ``dashboards``: one
    row per SAE with a dashboard ({target, hookpoint, sae, latents, width, groups, href})."""
    rows = summary["saes"]
    many = len(summary.get("targets", [])) > 1
    cols = [c for c in COLUMNS if (c[0] != "target" or many) and any(r.get(c[0]) is not None for r in rows)]
    left = sum(1 for c in cols if c[0] in ("target", "hookpoint", "arch"))
    dash = {(d["target"], d["hookpoint"], d["sae"]): d["href"] for d in dashboards}
    sae_rows = []
    for r in rows:
        href = dash.get((r["target"], r["hookpoint"], r["name"]))
        sae_rows.append([r.get(k) for k, _ in cols] + [link(href, "latents") if href else None])
    toc = [("#targets", "Targets"), ("#stages", "Stage times"), ("#saes", "SAEs"), ("#tradeoffs", "Trade-offs")]
    if dashboards:
        toc.append(("#dashboards", "Feature dashboards"))
    parts = [f"<h1>Audit {html.escape(summary['run'])}</h1>",
             "<nav class=toc>" + "".join(f'<a href="{h}">{html.escape(t)}</a>' for h, t in toc)
             + "".join(f'<a href="{html.escape(h, quote=True)}">{html.escape(t)}</a>' for h, t, _ in sections) + "</nav>"]
    if sections:
        parts.append("<ul>" + "".join(f'<li><a href="{html.escape(h, quote=True)}">{html.escape(t)}</a>: '
                                      f"{html.escape(line)}</li>" for h, t, line in sections) + "</ul>")
    parts += ["<h2 id=targets>Targets</h2>",
              table(["model", "revision", "hook points", "harvested tokens per hook point", "clean held-out loss"],
                    [[t["model"], t["revision"], Html(f"<span class=w>{html.escape(', '.join(t.get('hookpoints') or []))}"
                                                      "</span>"), t.get("harvest_rows"), t.get("loss_clean")]
                     for t in summary.get("targets", [])], _fmt, left=3, sortable=True),
              "<h2 id=stages>Stage times (s)</h2>", stage_tables(summary, report_s),
              "<h2 id=saes>SAEs</h2>",
              table([c[1] for c in cols] + ["dashboard"], sae_rows, _fmt, left=left, sortable=True),
              "<p class=muted>Click a column to sort. L0, FVU, dead: on held-out tokens. CE recovered = "
              "(L_zero − L_sae)/(L_zero − L_clean), zero-ablation reference. KL: mean per-token KL(clean ‖ spliced). "
              "All columns and the SAE files: summary.json.</p>",
              "<h2 id=tradeoffs>Trade-offs</h2>", img(pngs.get("l0_vs_fvu.png"), "L0 vs FVU"),
              img(pngs.get("l0_vs_ce_loss_recovered.png"), "L0 vs CE loss recovered")]
    if dashboards:
        parts += ["<h2 id=dashboards>Feature dashboards</h2>",
                  "<p>Per SAE, its latents with their top activating contexts, samples from lower activation "
                  "intervals, activation density, logit lens, nearest latents and, where known, planted concept and "
                  "GradSAE influence. Exported for SAEDashboard and Neuronpedia by <code>saeray export</code>.</p>",
                  table(["target", "hook point", "SAE", "latents shown", "width", "groups", "dashboard"],
                        [[d["target"], d["hookpoint"], d["sae"], d["latents"], d["width"], d["groups"],
                          link(d["href"], "open")] for d in dashboards], _fmt, left=3, sortable=True)]
    parts.append("<p class=muted>Files: summary.json (the SAE table); targets/&lt;model&gt;@&lt;revision&gt;/ holds "
                 "each target's activations, SAEs, eval.json and dashboards (docs/store.md).</p>")
    return "\n".join(parts)


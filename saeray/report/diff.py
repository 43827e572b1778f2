"""The report's "changes since the previous run" page (``diff.html``), from the run's
``diff/previous.json`` (:mod:`saeray.schedule.diff`): the alerts first, then per pair of targets
the metric deltas and feature matching per SAE, the most changed features, the most influential
latents that entered or left, and the concepts lost and gained.

Latent numbers of this run link into its dashboards where one shows them; the previous run's
report is linked relatively when both runs sit in one series folder. Every name is escaped.
"""
from __future__ import annotations

import html
from typing import Callable

from .concepts import READ
from .markup import Html, fmt, link, table


def _d(v) -> str:
    return "–" if v is None else f"{v:+.4g}"


def previous_href(d: dict) -> str | None:
    """The previous run's report, relative to this report's pages, when both are runs of one series."""
    a, b = d["a"]["url"].rstrip("/"), d["b"]["url"].rstrip("/")
    if a.rsplit("/", 1)[0] == b.rsplit("/", 1)[0]:
        return f"../../{a.rsplit('/', 1)[1]}/report/index.html"
    return None


def render(d: dict, latent_link: Callable[[str, str, str, int], str | None]) -> str:
    a, b = d["a"]["run"], d["b"]["run"]
    prev = previous_href(d)
    parts = [f"<h1>Changes since {html.escape(str(a))}</h1>",
             f"<p>This run, {html.escape(str(b))}, against "
             + (link(prev, str(a)) if prev else html.escape(str(a))) + f" ({html.escape(d['a']['url'])}). "
             f"Features are matched when their decoder directions are each other's nearest with cosine ≥ "
             f"{d['threshold']:g}.</p>"]
    alerts = d.get("alerts") or []
    if alerts:
        parts.append("<div class=alert><h2>Alerts</h2><ul>"
                     + "".join(f"<li>{html.escape(x['message'])}</li>" for x in alerts) + "</ul></div>")
    else:
        parts.append("<p class=muted>No alert threshold was crossed.</p>")

    def lat(tid: str, hp: str, sae: str, i: int) -> Html | str:
        h = latent_link(tid, hp, sae, i)
        return link(h, str(i)) if h else str(i)

    for t in d["targets"]:
        parts.append(f"<h2>{html.escape(t['model'])}: {html.escape(t['revision_a'])} → "
                     f"{html.escape(t['revision_b'])}</h2>")
        rows = []
        for s in t["saes"]:
            m, f, inf = s["metrics"], s["features"], s.get("influential")
            rows.append([s["hookpoint"], s["sae"], _d(m["fvu"]["delta"]), _d(m["l0"]["delta"]),
                         _d(m["ce_loss_recovered"]["delta"]), _d(m["kl"]["delta"]), _d(m["dead_frac"]["delta"]),
                         f"{f['matched_share']:.1%}" if f.get("comparable") else "–",
                         f.get("mcs"), f.get("born"), f.get("lost"),
                         f"{inf['overlap']:.0%}" if inf else "–"])
        parts.append(table(["hook point", "SAE", "FVU Δ", "L0 Δ", "CE loss rec. Δ", "KL Δ", "dead Δ", "matched",
                            "MCS", "born", "lost", "top influential kept"], rows, lambda v: fmt(v, 3), left=2,
                           sortable=True))
        parts.append("<p class=muted>Δ: this run minus the previous. matched: share of this SAE's features with a "
                     "mutual nearest decoder match in the previous run's; MCS: mean best cosine; born / lost: "
                     "features without a match in this run / the previous; top influential kept: share of the "
                     "GradSAE most influential latents matched to one of the previous run's.</p>")
        changed = []
        for s in t["saes"]:
            for x in s["features"].get("most_changed", [])[:3]:
                changed.append([s["hookpoint"], s["sae"], lat(t["b"], s["hookpoint"], s["sae"], x["b"]), x["a"],
                                x["cos"]])
        if changed:
            parts.append("<h3>Matched features that turned most</h3>")
            parts.append(table(["hook point", "SAE", "latent (this run)", "latent (previous)", "cosine"], changed,
                               lambda v: fmt(v, 3), left=2))
        infl = []
        for s in t["saes"]:
            inf = s.get("influential")
            if inf and (inf["entered"] or inf["left"]):
                infl.append([s["hookpoint"], s["sae"],
                             Html(", ".join(lat(t["b"], s["hookpoint"], s["sae"], i) for i in inf["entered"][:10])),
                             ", ".join(map(str, inf["left"][:10]))])
        if infl:
            parts.append("<h3>Most influential latents (GradSAE) that entered or left</h3>")
            parts.append(table(["hook point", "SAE", "entered (this run)", "left (previous run's)"], infl,
                               lambda v: fmt(v, 3), left=4))
        if t.get("concepts") is not None:
            crow = [[c["hookpoint"], c["by"], c["a"], c["b"], ", ".join(c["lost"]) or "–", ", ".join(c["gained"]) or "–"]
                    for c in t["concepts"]]
            parts.append(f"<h3>Planted concepts recovered (test AUROC ≥ {READ:g})</h3>")
            parts.append(table(["hook point", "by", "previous", "this run", "lost", "gained"], crow,
                               lambda v: fmt(v, 3), left=2))
        for k, label in (("added", "SAEs only in this run"), ("removed", "SAEs only in the previous run")):
            if t[k]:
                parts.append(f"<p>{label}: {html.escape(', '.join(t[k]))}</p>")
    for side, label in (("a", "previous run"), ("b", "this run")):
        if d["unpaired"][side]:
            parts.append(f"<p>Targets only in the {label}: {html.escape(', '.join(d['unpaired'][side]))}</p>")
    return "\n".join(parts)

"""The report's planted-concept recovery section: for every SAE of a target, each planted concept's
best single latent and k-sparse latent probe beside a supervised linear probe on the same
activations (the ``presence`` stage's held-out scores, :mod:`saeray.emergence.presence`), so a
reader sees which concepts the SAEs miss although the model represents them.

Per target: a summary (per SAE, how many concepts its best latent and its k-sparse probe recover
against how many the linear probe reads, and which ones it misses), then one table per hook point:
rows are concepts, columns the linear probe's test AUROC and, per SAE, the best latent's and the
largest-k sparse probe's. A cell is marked (``td.miss`` in ``assets/report.css``) where the linear probe
reads the concept (AUROC >= :data:`READ`) but the SAE's measure stays below :data:`MISSED`.

Every string from a model, a spec or a file (concept, hook point and SAE names, links) is escaped.
"""
from __future__ import annotations

import html
import logging
from typing import Callable, Union

import pyarrow as pa

from .markup import fmt, table

log = logging.getLogger("saeray")

READ = 0.9       # the linear probe reads a concept / an SAE measure recovers it: test AUROC >= this
MISSED = 0.8     # ... and an SAE measure below this is "represented but missed"

Link = Callable[[str, str, str, int], Union[str, None]]


def _fmt(v) -> str:
    return fmt(v, 3)


def _rows(t) -> list[dict]:
    return t.to_pylist() if isinstance(t, pa.Table) else list(t)


def _ok(v) -> bool:
    return v is not None and v == v   # not missing, not NaN


def _index(rows: list[dict]):
    """{(hookpoint, sae, measure, k, concept): row}, the SAEs, hook points and concepts in order of
    appearance, and per SAE the largest k of its sparse probes."""
    idx: dict[tuple, dict] = {}
    saes: list[str] = []
    hps: list[str] = []
    concepts: list[str] = []
    kmax: dict[str, int] = {}
    for r in rows:
        sae = r.get("sae") or ""
        m = r["measure"]
        idx[(r["hookpoint"], sae if m != "linear" else "", m, r.get("k") or 0, r["concept"])] = r
        if r["hookpoint"] not in hps:
            hps.append(r["hookpoint"])
        if r["concept"] not in concepts:
            concepts.append(r["concept"])
        if m != "linear" and sae not in saes:
            saes.append(sae)
        if m == "sparse":
            kmax[sae] = max(kmax.get(sae, 0), int(r["k"]))
    layer = {r["hookpoint"]: r.get("layer") for r in rows}
    first = {h: i for i, h in enumerate(hps)}
    hps = sorted(hps, key=lambda h: (layer[h] if layer.get(h) is not None else 1 << 30, first[h]))
    return idx, saes, hps, concepts, kmax


def _cell(r: dict | None, lin: float | None, latent_link: str | None = None, show_latent: bool = False) -> str:
    v = r["auroc"] if r is not None else None
    miss = _ok(lin) and lin >= READ and _ok(v) and v < MISSED
    text = html.escape(_fmt(v))
    if latent_link is not None:
        text = f'<a href="{html.escape(latent_link, quote=True)}">{text}</a>'
    if show_latent and r is not None and r.get("latents"):
        text += f" <small>#{int(r['latents'][0])}</small>"
    title = ""
    if r is not None and r.get("latents"):
        lat = ", ".join(str(int(i)) for i in r["latents"])
        title = f' title="{html.escape(("latent " if len(r["latents"]) == 1 else "latents ") + lat, quote=True)}"'
    return f"<td{' class=miss' if miss else ''}{title}>{text}</td>"


def _hookpoint_table(tid: str, hp: str, idx: dict, saes: list[str], concepts: list[str], kmax: dict[str, int],
                     link: Link | None) -> str:
    head1 = ['<th rowspan=2 class=l>concept</th>', '<th rowspan=2>linear</th>']
    head2 = []
    for s in saes:
        k = kmax.get(s)
        head1.append(f'<th colspan={2 if k else 1}>{html.escape(s)}</th>')
        head2.append("<th>latent</th>" + (f"<th>k={k}</th>" if k else ""))
    body = []
    for c in concepts:
        lin_r = idx.get((hp, "", "linear", 0, c))
        lin = lin_r["auroc"] if lin_r is not None else None
        cells = [f"<td class=l>{html.escape(c)}</td>", _cell(lin_r, None)]
        any_row = lin_r is not None
        for s in saes:
            lat = idx.get((hp, s, "latent", 1, c))
            any_row = any_row or lat is not None
            href = None
            if link is not None and lat is not None and lat.get("latents"):
                href = link(tid, hp, s, int(lat["latents"][0]))
            cells.append(_cell(lat, lin, href, show_latent=True))
            if kmax.get(s):
                sp = idx.get((hp, s, "sparse", kmax[s], c))
                any_row = any_row or sp is not None
                cells.append(_cell(sp, lin))
        if any_row:
            body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return ""
    return (f"<p class=lk><b>{html.escape(hp)}</b></p>"
            f"<div class=scroll><table><thead><tr>{''.join(head1)}</tr><tr>{''.join(head2)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def summary_rows(rows: list[dict]) -> tuple[list[list], dict[str, list[str]]]:
    """Per SAE: [SAE, concepts the best latent recovers, the k-sparse probe (largest k) recovers,
    the linear probe reads, of those the best latent misses] (each: AUROC >= READ at some hook
    point), and per SAE the concepts the linear probe reads but its best latent recovers at no
    hook point."""
    idx, saes, hps, concepts, kmax = _index(rows)

    def best(sae: str, measure: str, k: int, c: str) -> float | None:
        vs = [idx[(hp, sae, measure, k, c)]["auroc"] for hp in hps if (hp, sae, measure, k, c) in idx]
        vs = [v for v in vs if _ok(v)]
        return max(vs) if vs else None

    read = [c for c in concepts if (best("", "linear", 0, c) or 0) >= READ]
    out, missed = [], {}
    for s in saes:
        lat = {c for c in concepts if (best(s, "latent", 1, c) or 0) >= READ}
        sp = {c for c in concepts if kmax.get(s) and (best(s, "sparse", kmax[s], c) or 0) >= READ}
        missed[s] = [c for c in read if c not in lat]
        out.append([s, len(lat), len(sp) if kmax.get(s) else None, len(read), len(missed[s])])
    return out, missed


def render_html(tables: dict[str, Union[pa.Table, list[dict]]], link: Link | None = None) -> str:
    """The section: per target (``tables``: target id -> its presence rows) a summary and one table
    per hook point. ``link(target, hookpoint, sae, latent)``: an href for a latent (its dashboard)
    or None; the best-latent cells link to it. An empty string when there are no rows."""
    parts = []
    many = len(tables) > 1
    for tid, t in tables.items():
        rows = _rows(t)
        if not rows:
            continue
        idx, saes, hps, concepts, kmax = _index(rows)
        srows, missed = summary_rows(rows)
        parts.append(f"<h3>{html.escape(tid)}</h3>" if many else "")
        ks = sorted(set(kmax.values()))
        parts.append(table(["SAE", f"best latent ≥ {READ}", f"{'k=' + '/'.join(map(str, ks)) if ks else 'k'}-sparse ≥ "
                            f"{READ}", f"linear ≥ {READ}", "missed by the latent"], srows, _fmt))
        lines = [f"<li><b>{html.escape(s)}</b>: {html.escape(', '.join(m))}</li>" for s, m in missed.items() if m]
        if lines:
            parts.append("<p class=muted>Read by the linear probe but by no single latent of the SAE (AUROC "
                         f"≥ {READ} at some hook point):</p><ul>{''.join(lines)}</ul>")
        per_hp = "".join(_hookpoint_table(tid, hp, idx, saes, concepts, kmax, link) for hp in hps)
        if many:
            per_hp = f"<details><summary>per hook point</summary>{per_hp}</details>"
        parts.append(per_hp)
    if not any(parts):
        return ""
    intro = ("<h2>Planted-concept recovery</h2><p class=muted>Held-out test AUROC per planted concept: a "
             "supervised linear probe on the hook point's activations (what the model represents there), and per "
             "SAE its best single latent (#index; chosen on the train split) and a logistic probe on its k "
             f"most concept-selective latents. Marked: the linear probe reads the concept (≥ {READ}) but the "
             f"SAE's measure stays below {MISSED}, represented but missed. Counts: concepts at or above {READ} at "
             "any hook point; – : too few held-out positives to score.</p>")
    return intro + "\n".join(p for p in parts if p)


def read_tables(run_store, summary: dict, manifest: dict | None = None) -> dict[str, pa.Table]:
    """Target id -> its presence rows, for the targets of ``summary`` (the report's summary: target
    ids and folders) whose presence stage is done in the run's manifest (``manifest``: its data, by
    default read from ``run_store``). A target whose tables cannot be read is left out, logged."""
    from ..emergence.presence import read_presence
    from ..manifest import FILE, stage_result

    if manifest is None:
        manifest = run_store.read_json(FILE) if run_store.exists(FILE) else {}
    out = {}
    for t in summary.get("targets", []):
        res = stage_result(manifest.get("targets", {}).get(t["target"], {}), "presence")
        if not res or not res.get("hookpoints"):
            continue
        try:
            out[t["target"]] = read_presence(run_store / t["folder"], res["hookpoints"], res.get("sae"))
        except Exception as e:  # noqa: BLE001 - a report without this section beats no report
            log.warning(f"report: the presence tables of {t['target']} could not be read ({e}); left out")
    return out

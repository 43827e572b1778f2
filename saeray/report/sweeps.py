"""The sweeps' part of the report: per sweep, agreement of each score with exact ablation per hook
point and SAE, and the paper's masking and steering tables (EM / F1 %, like its Table 1). One
renderer for the HTML page and one for the terminal (``saeray sweep``)."""
from __future__ import annotations

import html
import math

AGREE_COLS = (("prompt_set", "prompts"), ("correct", "kept"), ("n_active", "active latents"),
              ("gradsae_spearman", "GradSAE ρ"), ("gradsae_pearson", "GradSAE r"),
              ("gradsae_topk_overlap", "GradSAE top-k"), ("signed_spearman", "signed ρ"),
              ("ig_spearman", "IG ρ"), ("ig_topk_overlap", "IG top-k"), ("activation_spearman", "activation ρ"),
              ("gradsae_latents_per_s", "GradSAE latents/s"), ("exact_latents_per_s", "exact latents/s"),
              ("speedup", "speed-up"))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def agreement_rows(res: dict) -> list[dict]:
    out = []
    for r in res.get("agreement", []):
        r = dict(r)
        g, e = r.get("gradsae_latents_per_s"), r.get("exact_latents_per_s")
        r["speedup"] = g / e if g and e and not math.isnan(g) and not math.isnan(e) else None
        out.append(r)
    return out


def pivot(rows: list[dict], settings: tuple[str, ...] = ("top", "bottom")) -> dict[tuple, tuple[list[str], list[list]]]:
    """Per (hook point, SAE, prompt set): (K labels, rows [side, method, "EM / F1" per K])."""
    blocks: dict[tuple, dict] = {}
    for r in rows:
        b = blocks.setdefault((r["hookpoint"], r["sae"], r["prompt_set"]), {"ks": [], "cells": {}, "ref": None})
        if r["method"] == "none":
            b["ref"] = r
            continue
        if r["k"] not in b["ks"]:
            b["ks"].append(r["k"])
        b["cells"][(r["side"], r["method"], r["k"])] = r
    out = {}
    for key, b in blocks.items():
        table = []
        for side in settings:
            for m in ("activation", "gradsae"):
                cells = [b["cells"].get((side, m, k)) for k in b["ks"]]
                if any(cells):
                    table.append([side, m] + [f"{c['em']:.1f} / {c['f1']:.1f}" if c else None for c in cells])
        if b["ref"] is not None:
            table.append(["none (SAE spliced)", "–"] + [f"{b['ref']['em']:.1f} / {b['ref']['f1']:.1f}"] * len(b["ks"]))
        out[key] = (b["ks"], table)
    return out


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < left else ""}>{html.escape(_fmt(v))}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(target: str, sweeps: dict) -> str:
    parts = []
    for name, res in sweeps.items():
        parts.append(f"<h2>Sweep {html.escape(name)} in {html.escape(target)}</h2>")
        ag = agreement_rows(res)
        if ag:
            parts.append("<h3>Agreement with exact ablation (per prompt over active latents; median ρ and r, mean top-k overlap)</h3>")
            parts.append(_table(["hook point", "SAE"] + [c[1] for c in AGREE_COLS],
                                [[r["hookpoint"], r["sae"]] + [r.get(c) for c, _ in AGREE_COLS] for r in ag], left=3))
        for table, title in (("masking", "Masking: EM / F1 % after zeroing the chosen latents at every position "
                                         "(lower after top-K = more influential)"),
                             ("steering", "Steering (released code: last position, partner's scores clamped to [0, 50]): "
                                          "EM / F1 % against the partner's answer")):
            for (hp, sae, ps), (ks, rows) in pivot(res.get(table, [])).items():
                parts.append(f"<h3>{html.escape(title)} — {html.escape(hp)}, {html.escape(sae)}, {html.escape(ps)}</h3>")
                parts.append(_table(["setting", "method"] + [f"K={k}" for k in ks], rows, left=2))
    if parts:
        parts.append("<p class=muted>ρ: Spearman, r: Pearson, between a score and the exact effect of zeroing each active "
                     "latent at every position (y unedited − y ablated). GradSAE: mean over positions of relu(∂y/∂f·f); "
                     "signed: Σ ∂y/∂f·f; IG: integrated gradients; activation: mean activation. Per-prompt rows: "
                     "targets/&lt;target&gt;/sweeps/&lt;sweep&gt;/ (Parquet).</p>")
    return "\n".join(parts)


def render_text(target: str, sweeps: dict) -> str:
    lines = []
    for name, res in sweeps.items():
        lines.append(f"sweep {name} — {target}")
        for r in agreement_rows(res):
            lines.append(f"  {r['hookpoint']} {r['sae']} {r['prompt_set']}: {r['correct']}/{r['prompts']} prompts kept; "
                         f"GradSAE ρ {_fmt(r['gradsae_spearman'])} r {_fmt(r['gradsae_pearson'])} "
                         f"top-k {_fmt(r['gradsae_topk_overlap'])}; signed ρ {_fmt(r['signed_spearman'])}; "
                         f"IG ρ {_fmt(r['ig_spearman'])}; speed-up {_fmt(r['speedup'])}")
        for table in ("masking", "steering"):
            for (hp, sae, ps), (ks, rows) in pivot(res.get(table, [])).items():
                lines.append(f"  {table} {hp} {sae} {ps} (EM / F1 %): " + " | ".join(f"K={k}" for k in ks))
                for row in rows:
                    lines.append(f"    {row[0]:>18} {row[1]:>10}  " + " | ".join(_fmt(c) for c in row[2:]))
    return "\n".join(lines)

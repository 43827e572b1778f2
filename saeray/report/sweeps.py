"""The sweeps' part of the report: per sweep, agreement of each score with exact ablation per hook
point and SAE, and the paper's masking and steering tables (EM / F1 %, like its Table 1). One
renderer for the HTML page and one for the terminal (``saeray sweep``)."""
from __future__ import annotations

import html
import math
from typing import Callable

from .markup import fmt, table

AGREE_COLS = (("kept", "prompts kept"), ("n_active", "active latents"),
              ("gradsae_spearman", "GradSAE ρ"), ("gradsae_topk_overlap", "GradSAE top-k"),
              ("signed_spearman", "signed ρ"), ("ig_spearman", "IG ρ"), ("ig_topk_overlap", "IG top-k"),
              ("activation_spearman", "activation ρ"), ("exact_latents_per_s", "exact latents/s"),
              ("speedup", "GradSAE speed-up"))


OUTPUT_WORDS = {"prob": "probability", "logprob": "log-probability", "logit_diff": "logit minus the largest other logit"}


def _fmt(v) -> str:
    return fmt(v, 3, grouped=True)


def agreement_rows(res: dict) -> list[dict]:
    out = []
    for r in res.get("agreement", []):
        r = dict(r)
        g, e = r.get("gradsae_latents_per_s"), r.get("exact_latents_per_s")
        r["speedup"] = g / e if g and e and not math.isnan(g) and not math.isnan(e) else None
        r["kept"] = f"{r['correct']}/{r['prompts']}"
        out.append(r)
    return out


def pivot(rows: list[dict], settings: tuple[str, ...] = ("top", "bottom")) -> dict[tuple, tuple[list[str], list[list]]]:
    """Per (SAE, prompt set): (K labels, rows [hook point, side, method, "EM / F1" per K]), each hook
    point's block closed by the unedited splice (``method: none``) when there is one."""
    blocks: dict[tuple, dict] = {}
    for r in rows:
        b = blocks.setdefault((r["sae"], r["prompt_set"]), {"ks": [], "hps": [], "cells": {}, "ref": {}})
        if r["hookpoint"] not in b["hps"]:
            b["hps"].append(r["hookpoint"])
        if r["method"] == "none":
            b["ref"][r["hookpoint"]] = r
            continue
        if r["k"] not in b["ks"]:
            b["ks"].append(r["k"])
        b["cells"][(r["hookpoint"], r["side"], r["method"], r["k"])] = r
    out = {}
    for key, b in blocks.items():
        body = []
        for hp in b["hps"]:
            for side in settings:
                for m in ("activation", "gradsae"):
                    cells = [b["cells"].get((hp, side, m, k)) for k in b["ks"]]
                    if any(cells):
                        body.append([hp, side, m] + [f"{c['em']:.1f} / {c['f1']:.1f}" if c else None for c in cells])
            ref = b["ref"].get(hp)
            if ref is not None:
                body.append([hp, "nothing masked", "–"] + [f"{ref['em']:.1f} / {ref['f1']:.1f}"] * len(b["ks"]))
        out[key] = (b["ks"], body)
    return out


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    return table(header, rows, _fmt, left)


def render_html(target: str, sweeps: dict, tables: Callable[[str, str], dict | None] | None = None) -> str:
    """``tables(target, sweep name)``: a look-up sweep's tables (:func:`saeray.sweeps.lookup_run.tables`)
    or None; without it a look-up sweep shows its figures only."""
    from .lookups import render_html as render_lookups

    parts, note_at = [], None
    for name, res in sweeps.items():
        if res.get("method") == "lookups":
            parts.append(render_lookups(target, name, res, tables(target, name) if tables else None))
            continue
        parts.append(f"<h2>Sweep {html.escape(name)} in {html.escape(target)}</h2>")
        if "error_term" in res:
            parts.append(f"<p>SAE spliced with its error term {'kept' if res['error_term'] else 'dropped (as the paper)'}; "
                         f"scores and effects on the answer's {html.escape(OUTPUT_WORDS.get(res['output'], res['output']))}"
                         f" at the answer step; positions aggregated by {html.escape(res['aggregate'])}.</p>")
        ag = agreement_rows(res)
        if ag:
            # an SAE or prompt set shared by every row goes in the heading, not in a column
            lead = [(k, h) for k, h in (("hookpoint", "hook point"), ("sae", "SAE"), ("prompt_set", "prompt set"))
                    if k == "hookpoint" or len({r[k] for r in ag}) > 1]
            shared = " on ".join(html.escape(str(ag[0][k])) for k in ("sae", "prompt_set") if k not in dict(lead))
            parts.append(f"<h3>Agreement with exact ablation{': ' + shared if shared else ''}</h3><p class=muted>Per "
                         "prompt over its active latents, then the median over prompts (ρ) or the mean (top-k overlap).</p>")
            parts.append(_table([h for _, h in lead] + [c[1] for c in AGREE_COLS],
                                [[r[k] for k, _ in lead] + [r.get(c) for c, _ in AGREE_COLS] for r in ag], left=len(lead)))
        for kind, title, note in (
                ("masking", "Masking", "EM / F1 % after zeroing the chosen latents at every position while decoding: "
                 "lower after masking the top-K means the score found influential latents; bottom-K should stay near 100."),
                ("steering", "Steering", "As the released code does it: at the last position, the prompt's chosen "
                 "latents zeroed and the partner prompt's top-K written with its scores clamped to [0, 50]; EM / F1 % "
                 "against the partner's answer.")):
            for (sae, ps), (ks, rows) in pivot(res.get(kind, [])).items():
                parts.append(f"<h3>{title}: {html.escape(sae)} on {html.escape(ps)}</h3><p class=muted>{html.escape(note)}</p>")
                parts.append(_table(["hook point", "setting", "method"] + [f"K={k}" for k in ks], rows, left=3))
        note_at = len(parts)
    if note_at is not None:     # the GradSAE sweeps' footnote, after the last of them
        parts.insert(note_at, "<p class=muted>ρ: Spearman between a score and the exact effect of zeroing each active "
                     "latent at every position (y unedited − y ablated); y is the sweep's output (default: the answer's "
                     "probability). GradSAE: mean over positions of relu(∂y/∂f·f); signed: Σ ∂y/∂f·f; IG: integrated "
                     "gradients; activation: mean activation. Speed-up: exact ablation's time over GradSAE's for the "
                     "same latents. Pearson r and per-prompt rows: summary.json and "
                     "targets/&lt;target&gt;/sweeps/&lt;sweep&gt;/ (Parquet; docs/store.md).</p>")
    return "\n".join(parts)


def render_text(target: str, sweeps: dict) -> str:
    from .lookups import render_text as render_lookups

    lines = []
    for name, res in sweeps.items():
        if res.get("method") == "lookups":
            lines.append(render_lookups(target, name, res))
            continue
        lines.append(f"sweep {name} — {target}")
        for r in agreement_rows(res):
            lines.append(f"  {r['hookpoint']} {r['sae']} {r['prompt_set']}: {r['correct']}/{r['prompts']} prompts kept; "
                         f"GradSAE ρ {_fmt(r['gradsae_spearman'])} r {_fmt(r['gradsae_pearson'])} "
                         f"top-k {_fmt(r['gradsae_topk_overlap'])}; signed ρ {_fmt(r['signed_spearman'])}; "
                         f"IG ρ {_fmt(r['ig_spearman'])}; speed-up {_fmt(r['speedup'])}")
        for kind in ("masking", "steering"):
            for (sae, ps), (ks, rows) in pivot(res.get(kind, [])).items():
                lines.append(f"  {kind} {sae} {ps} (EM / F1 %): " + " | ".join(f"K={k}" for k in ks))
                for row in rows:
                    lines.append(f"    {row[0]:>14} {row[1]:>14} {row[2]:>10}  " + " | ".join(_fmt(c) for c in row[3:]))
    return "\n".join(lines)

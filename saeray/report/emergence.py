"""The emergence part of the report: when (checkpoint), where (layer) and at what size each concept's
feature is present, what the step-0 control removed, re-activations across layers, behaviour beside
the concepts it needs, and how features match and persist across checkpoints. One renderer for the
HTML page and one for the terminal (``saeray bench emergence``)."""
from __future__ import annotations

import html

from .markup import fmt, img, table


def _fmt(v) -> str:
    return fmt(v, 3)


def _settings_line(st: dict) -> str:
    m = st["measure"] + (f" (k = {st['presence_k']})" if st["measure"] == "sparse" else "")
    return (f"present: {m} {st['score']} ≥ {st['threshold']} and ≥ the same size and layer's step-0 value + "
            f"{st['margin']}; SAE {st['sae']}; features match at decoder cosine ≥ {st['match_cos']}")


def time_rows(s: dict) -> list[list]:
    return [[c] + [s["emergence_step"][c].get(m) for m in s["models"]] for c in s["concepts"]]


def scale_rows(s: dict) -> list[list]:
    steps = [x for x in s["steps"] if x != 0]
    return [[c] + [s["scale_threshold"][c].get(str(x)) for x in steps] for c in s["concepts"]]


def behaviour_rows(s: dict) -> list[list]:
    out = []
    for b, per in sorted(s.get("behaviour", {}).items()):
        for r in per:
            em = {c: e for c, e in r["concepts"].items()}
            out.append([b, r["model"], r["behaviour_step"], ", ".join(f"{c}: {_fmt(e)}" for c, e in em.items())])
    return out


def matching_rows(s: dict) -> list[list]:
    """Per size and step transition: the mean over hook points of the one-to-one matched share."""
    acc: dict[tuple, list[float]] = {}
    for r in s["matching"]:
        if r["axis"] == "time":
            acc.setdefault((r["size"], r["step_a"], r["step_b"]), []).append(r["matched_one_to_one"])
    return [[s["models"][z], f"{a} → {b}", sum(v) / len(v)] for (z, a, b), v in sorted(acc.items())]


def layer_matching_rows(s: dict) -> list[list]:
    final = s["steps"][-1]
    return [[s["models"][r["size"]], f"{r['hookpoint_a']} → {r['hookpoint_b']}", r["matched_one_to_one"],
             r["one_to_one_mean"]] for r in s["matching"] if r["axis"] == "layer" and r["step_a"] == final]


def render_html(s: dict, pngs: dict[str, bytes]) -> str:
    models = s["models"]
    steps = [x for x in s["steps"] if x != 0]
    parts = ["<h2>Emergence across checkpoints, layers and sizes</h2>",
             f"<p class=muted>{html.escape(_settings_line(s['settings']))}. Definitions: docs/emergence.md.</p>",
             img(pngs.get("emergence_curves.png"), "emergence curves"),
             "<h3>Time thresholds: the first checkpoint from which the concept stays present</h3>",
             table(["concept"] + models, time_rows(s), _fmt),
             "<h3>Scale thresholds: the smallest size where the concept is present</h3>",
             table(["concept"] + [f"step {x}" for x in steps], scale_rows(s), _fmt),
             img(pngs.get("scale_curves.png"), "scale curves")]
    if s["reactivations"]:
        parts += ["<h3>Re-activations: present at one layer, absent at a later one, present again</h3>",
                  table(["concept", "model", "step", "present at", "absent at", "present again at"],
                        [[r["concept"], r["model"], r["step"], r["first"], ", ".join(map(str, r["absent"])), r["again"]]
                         for r in s["reactivations"]], _fmt, left=2)]
    else:
        parts.append("<p>No re-activation across layers at any size and checkpoint.</p>")
    if s.get("control_effect"):
        rows = [[m, z, len(d["with_control"]), len(d["without_control"]), ", ".join(d["removed"]) or "–"]
                for m, per in s["control_effect"].items() for z, d in per.items()]
        parts += ["<h3>What the step-0 control changes, per measure</h3>",
                  table(["measure", "model", "concepts emerged", "without the control", "removed by the control"],
                        rows, _fmt, left=2)]
    if s["removed_by_step0_control"]:
        parts += ["<h3>Removed by the step-0 control (read as well by the random initialisation)</h3>",
                  table(["concept", "model", "best step-0 score"],
                        [[r["concept"], r["model"], r["step0_best"]] for r in s["removed_by_step0_control"]],
                        _fmt, left=2)]
    for m in models:
        parts.append(img(pngs.get(f"layer_maps_{m}.png"), f"layer maps {m}"))
    if s.get("behaviour"):
        parts += ["<h3>Behaviour beside features</h3>",
                  table(["behaviour", "model", "possible from step", "its concepts' emergence steps"],
                        behaviour_rows(s), _fmt, left=4),
                  img(pngs.get("behaviour.png"), "behaviour")]
    parts += ["<h3>Features matched across checkpoints (one-to-one, share of features)</h3>",
              table(["model", "checkpoints", "matched share"], matching_rows(s), _fmt, left=2),
              "<h3>Features matched across neighbouring layers at the last checkpoint</h3>",
              table(["model", "layers", "matched share", "mean cosine"], layer_matching_rows(s), _fmt, left=2)]
    if s.get("concept_lineage"):
        parts += ["<h3>Each emerged concept's best latent at the last checkpoint: when its feature was born</h3>",
                  table(["concept", "model", "hook point", "latent", "concept emerged", "feature born", "drift (cos)"],
                        [[r["concept"], r["model"], r["hookpoint"], r["latent"], r["emergence_step"],
                          r["feature_born_step"], r["drift"]] for r in s["concept_lineage"]], _fmt, left=3)]
    parts.append("<p class=muted>Files: emergence/summary.json, scores.parquet (every measure per target, layer "
                 "and concept), matching.parquet, the PNGs.</p>")
    return "\n".join(parts)


def render_text(s: dict) -> str:
    """The terminal summary (bench): emergence steps, scale thresholds at the last step, behaviour."""
    w = max(len(c) for c in s["concepts"]) if s["concepts"] else 10
    lines = [_settings_line(s["settings"]), "",
             "emergence step per size (–: never stays present); scale threshold at the last step",
             f"{'concept':<{w}}  " + "  ".join(f"{m:>14}" for m in s["models"]) + "   smallest size"]
    last = str(s["steps"][-1])
    for c in s["concepts"]:
        lines.append(f"{c:<{w}}  " + "  ".join(f"{_fmt(s['emergence_step'][c].get(m)):>14}" for m in s["models"])
                     + f"   {_fmt(s['scale_threshold'][c].get(last))}")
    lines.append("")
    lines.append(f"re-activations: {len(s['reactivations'])}")
    for r in s["reactivations"][:20]:
        lines.append(f"  {r['concept']} {r['model']} step {r['step']}: layer {r['first']} → absent "
                     f"{r['absent']} → layer {r['again']}")
    for row in behaviour_rows(s):
        lines.append(f"{row[0]} {row[1]}: possible from step {_fmt(row[2])}; concepts: {row[3]}")
    return "\n".join(lines)

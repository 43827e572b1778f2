"""The run-level emergence analysis: every target's presence tables joined into one grid
(size x checkpoint x layer x concept), then presence with the step-0 control, time and scale
thresholds, re-activations, feature matching and lineages, behaviour beside features, and the
figures. Written under ``<run>/emergence/``::

    scores.parquet     every target's presence rows of the chosen SAE (``emergence.sae``) and of the
                       linear probe, with model, size, revision and step
    matching.parquet   decoder-cosine summaries of neighbouring checkpoints and layers
    summary.json       everything the report and ``saeray bench emergence`` print
    *.png              emergence curves, layer maps, scale curves, behaviour

Recorded in the manifest as the run-level stage ``emergence`` with a key (the emergence section
and every target's presence result): re-running a finished run recomputes nothing; a run whose
targets changed is analysed again.
"""
from __future__ import annotations

import calendar
import hashlib
import io
import json
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import matching, thresholds
from .behaviour import BEHAVIOURS, behaviour_steps, zoo_curves
from .presence import choose_sae, read_presence

log = logging.getLogger("saeray")

DIR = "emergence"


def _final_step(model: str) -> int | None:
    from ..modelref import ZOO_PREFIX

    if model.startswith(ZOO_PREFIX):
        from ..storyworld.zoo import config_for

        return config_for(model).steps
    return None


def of_sae(tab: pa.Table, sae: str) -> pa.Table:
    """The presence rows the analysis reads: SAE ``sae``'s, and the linear probe's (no SAE)."""
    import pyarrow.compute as pc

    return tab.filter(pc.or_(pc.equal(tab["measure"], "linear"), pc.fill_null(pc.equal(tab["sae"], sae), False)))


def grid(rc) -> tuple[pa.Table, list[dict]]:
    """All presence rows of the chosen SAE (and the linear probe) with (model, size, revision,
    step) columns, and the targets in grid order."""
    spec = rc.resolved
    sae = choose_sae(spec)
    sizes = {m.name: i for i, m in enumerate(spec.models)}
    steps_by_model: dict[str, list[int]] = {}
    for t in rc.targets:
        s = thresholds.step_of(t.revision)
        if s is not None:
            steps_by_model.setdefault(t.model, []).append(s)
    parts, targets = [], []
    for t in rc.targets:
        res = rc.manifest.result(t.id, "presence")
        if res is None:
            raise RuntimeError(f"emergence: target {t} has no finished presence stage")
        last = _final_step(t.model) or (max(steps_by_model.get(t.model, [0])) + 1)
        step = thresholds.step_of(t.revision, last)
        if t.revision == "main" and step in steps_by_model.get(t.model, []):
            log.info(f"emergence: {t} is the same checkpoint as step{step}; counted once")
            continue
        if sae not in res.get("saes", [sae]):
            raise RuntimeError(f"emergence: target {t} has no presence scores of SAE {sae} "
                               f"(scored: {', '.join(res['saes'])})")
        tab = of_sae(read_presence(rc.store / t.folder, res["hookpoints"], res.get("sae")), sae)
        n = tab.num_rows
        tab = (tab.append_column("model", pa.array([t.model] * n, pa.string()))
                  .append_column("size", pa.array([sizes[t.model]] * n, pa.int32()))
                  .append_column("revision", pa.array([t.revision] * n, pa.string()))
                  .append_column("step", pa.array([step] * n, pa.int64())))
        parts.append(tab)
        targets.append({"target": t.id, "model": t.model, "size": sizes[t.model], "revision": t.revision, "step": step,
                        "folder": t.folder, "sae": sae, "hookpoints": res["hookpoints"]})
    return pa.concat_tables(parts), targets


def of_measure(r: dict, measure: str, k: int) -> bool:
    """Is presence row ``r`` the measure (``k`` counts for the sparse probes only)?"""
    return r["measure"] == measure and (measure != "sparse" or r["k"] == k)


def score_map(rows: list[dict], measure: str, k: int, score: str) -> dict[thresholds.Key, float]:
    return {(r["size"], r["step"], r["layer"], r["concept"]): r[score] for r in rows if of_measure(r, measure, k)}


def match_features(rc, targets: list[dict], thr: float) -> tuple[list[dict], dict]:
    """Neighbouring checkpoints (same size and hook point) and layers (same size, checkpoint and hook
    kind): decoder-cosine summaries; lineages along checkpoints per (size, hook point)."""
    from ..models.hookpoints import parse
    from ..sae import io as sae_io

    dec: dict[tuple[int, int, str], np.ndarray] = {}
    for t in targets:
        tstore = rc.store / t["folder"]
        trained = rc.manifest.result(t["target"], "train")["saes"]
        for hp in t["hookpoints"]:
            sae = sae_io.load(tstore.url_of(trained[hp][t["sae"]]["path"]), device="cpu")
            dec[(t["size"], t["step"], hp)] = sae.W_dec.detach().float().numpy()
    rows, lins = [], {}
    by_chain: dict[tuple[int, str], list[int]] = {}
    for (z, s, hp) in dec:
        by_chain.setdefault((z, hp), []).append(s)
    for (z, hp), steps in sorted(by_chain.items()):
        steps = sorted(steps)
        for a, b in zip(steps, steps[1:]):
            rows.append({"axis": "time", "size": z, "hookpoint_a": hp, "step_a": a, "hookpoint_b": hp, "step_b": b,
                         **matching.summary(matching.cosines(dec[(z, a, hp)], dec[(z, b, hp)]), thr)})
        ls = matching.lineages([dec[(z, s, hp)] for s in steps], thr)
        lins[(z, hp)] = (steps, ls)
    by_layer: dict[tuple[int, int, str], list[str]] = {}
    for (z, s, hp) in dec:
        by_layer.setdefault((z, s, parse(hp).kind), []).append(hp)

    for (z, s, _), hps in sorted(by_layer.items()):
        hps = sorted(hps, key=lambda h: parse(h).layer)
        for a, b in zip(hps, hps[1:]):
            rows.append({"axis": "layer", "size": z, "hookpoint_a": a, "step_a": s, "hookpoint_b": b, "step_b": s,
                         **matching.summary(matching.cosines(dec[(z, s, a)], dec[(z, s, b)]), thr)})
    return rows, lins


def _best_rows(rows: list[dict], measure: str, k: int, score: str) -> dict[tuple, dict]:
    """Per (size, step, concept): the row of the layer with the best score for ``measure``."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if not of_measure(r, measure, k):
            continue
        v = r[score]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = (r["size"], r["step"], r["concept"])
        if key not in out or v > out[key][score]:
            out[key] = r
    return out


def analyse(rc, tab: pa.Table, targets: list[dict]) -> dict:
    """Everything the emergence section reports over :func:`grid`'s table, as one JSON-able dict."""
    em = rc.resolved.emergence
    rows = tab.to_pylist()
    models = [m.name for m in rc.resolved.models]
    steps = sorted({t["step"] for t in targets})
    concepts = sorted({r["concept"] for r in rows})
    scores = score_map(rows, em.measure, em.presence_k, em.score)
    present = thresholds.presence(scores, em.threshold, em.margin)
    emerg = thresholds.emergence_steps(present)
    scale = thresholds.scale_thresholds(present)
    react = thresholds.reactivations(present)
    any_layer = thresholds.present_any_layer(present)

    # beside the presence measure, every measure's best layer, for the ceilings and the tables
    best = {name: _best_rows(rows, m, k, em.score) for name, (m, k) in
            {"latent": ("latent", 1), f"sparse_k{em.presence_k}": ("sparse", em.presence_k),
             "linear": ("linear", 0)}.items()}
    never_by_control = []
    for c in concepts:
        for z in range(len(models)):
            passed = [(s, l) for (zz, s, l, cc), v in scores.items()
                      if (zz, cc) == (z, c) and s != 0 and v is not None and not math.isnan(v) and v >= em.threshold]
            if passed and not any(any_layer.get((z, s, c)) for s in steps if s != 0):
                never_by_control.append({"concept": c, "size": z, "model": models[z],
                                         "step0_best": max((v for (zz, s, l, cc), v in scores.items()
                                                            if (zz, s, cc) == (z, 0, c)), default=None)})

    # what the step-0 control changes, per measure: concepts that emerge with and without it
    control = {}
    for name, (m, k) in {"latent": ("latent", 1), f"sparse_k{em.presence_k}": ("sparse", em.presence_k),
                         "linear": ("linear", 0)}.items():
        sc = score_map(rows, m, k, em.score)
        with_c = thresholds.emergence_steps(thresholds.presence(sc, em.threshold, em.margin))
        without = thresholds.emergence_steps(thresholds.presence(sc, em.threshold, -1.0))
        control[name] = {models[z]: {"with_control": sorted(c for (c, zz), v in with_c.items() if zz == z and v is not None),
                                     "without_control": sorted(c for (c, zz), v in without.items()
                                                               if zz == z and v is not None)}
                         for z in range(len(models))}
        for d in control[name].values():
            d["removed"] = sorted(set(d["without_control"]) - set(d["with_control"]))

    match_rows, lins = match_features(rc, targets, em.match_cos)
    lineage = {}
    for (z, hp), (ssteps, ls) in lins.items():
        lineage[f"{models[z]}|{hp}"] = {"steps": ssteps, "counts": matching.lineage_counts(ls, len(ssteps)),
                                        "mean_drift_alive_at_end": _mean([l.drift for l in ls
                                                                          if l.last == len(ssteps) - 1 and l.born == 0])}
    # each emerged concept's best latent at the last checkpoint: when was that feature born?
    concept_lineage = []
    final = steps[-1]
    for c in concepts:
        for z in range(len(models)):
            r = best["latent"].get((z, final, c))
            if r is None or (c, z) not in emerg or emerg[(c, z)] is None:
                continue
            ssteps, ls = lins[(z, r["hookpoint"])]
            lin = matching.lineage_of(ls, len(ssteps) - 1, r["latents"][0])
            concept_lineage.append({"concept": c, "model": models[z], "hookpoint": r["hookpoint"],
                                    "latent": r["latents"][0], "emergence_step": emerg[(c, z)],
                                    "feature_born_step": ssteps[lin.born] if lin else None,
                                    "drift": lin.drift if lin else None})

    behaviour = {}
    for z, m in enumerate(models):
        curves = zoo_curves(m)
        if curves is None:
            continue
        bsteps = behaviour_steps(curves, [s for s in steps], em.behaviour_threshold)
        for b, d in BEHAVIOURS.items():
            behaviour.setdefault(b, []).append({
                "model": m, "behaviour_step": bsteps[b],
                "accuracy": {str(s): curves[b].get(s) for s in steps},
                "concepts": {c: emerg.get((c, z)) for c in d["concepts"] if c in concepts}})

    summary = {
        "models": models, "steps": steps, "concepts": concepts, "targets": targets,
        "settings": {"measure": em.measure, "presence_k": em.presence_k, "score": em.score,
                     "threshold": em.threshold, "margin": em.margin, "match_cos": em.match_cos,
                     "behaviour_threshold": em.behaviour_threshold, "sae": targets[0]["sae"] if targets else None},
        "emergence_step": {c: {models[z]: emerg.get((c, z)) for z in range(len(models))} for c in concepts},
        "scale_threshold": {c: {str(s): (models[scale[(c, s)]] if scale.get((c, s)) is not None else None)
                                for s in steps if s != 0} for c in concepts},
        "reactivations": [{"concept": r.concept, "model": models[r.size], "step": r.step, "first": r.first,
                           "absent": list(r.absent), "again": r.again} for r in react],
        "removed_by_step0_control": never_by_control,
        "control_effect": control,
        "present": [{"concept": c, "model": models[z], "step": s, "layer": l} for (z, s, l, c), p in
                    sorted(present.items()) if p],
        "best": {name: [{"concept": c, "model": models[z], "step": s, "layer": r["layer"], "auroc": r["auroc"],
                         "f1": r["f1"]} for (z, s, c), r in sorted(b.items())] for name, b in best.items()},
        "matching": match_rows, "lineages": lineage, "concept_lineage": concept_lineage, "behaviour": behaviour,
    }
    return summary


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def key(rc) -> str:
    """What the analysis depends on: the emergence section and every target's presence result."""
    d = {"emergence": rc.spec.emergence.model_dump(mode="json"),
         "targets": {t.id: rc.manifest.result(t.id, "presence") for t in rc.targets}}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def emergence_stage(rc) -> dict:
    """Run (or reuse) the analysis; returns the summary."""
    from .plots import figures

    rec = rc.manifest.stage(None, "emergence")
    k = key(rc)
    if rec.get("status") == "done" and rec.get("key") == k and rc.store.exists(f"{DIR}/summary.json"):
        log.info("emergence: analysis already done, skipped")
        return rc.store.read_json(f"{DIR}/summary.json")
    rc.manifest.set_stage(None, "emergence", status="running", key=k)
    t0 = time.perf_counter()
    tab, targets = grid(rc)
    summary = analyse(rc, tab, targets)
    buf = io.BytesIO()
    pq.write_table(tab, buf, compression="zstd")
    rc.store.write_bytes(f"{DIR}/scores.parquet", buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(summary["matching"]), buf, compression="zstd")
    rc.store.write_bytes(f"{DIR}/matching.parquet", buf.getvalue())
    pngs = figures(summary, tab.to_pylist())
    for name, data in pngs.items():
        rc.store.write_bytes(f"{DIR}/{name}", data)
    summary["figures"] = sorted(pngs)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    # the whole job's time when it ran in one go: from the run's creation to this analysis
    created = calendar.timegm(time.strptime(rc.manifest.data["created"], "%Y-%m-%dT%H:%M:%SZ"))
    summary["since_run_created_s"] = round(time.time() - created, 1)
    rc.store.write_json(f"{DIR}/summary.json", summary)
    rc.manifest.set_stage(None, "emergence", status="done", key=k, wall_s=summary["wall_s"],
                          result={"figures": summary["figures"], "concepts": len(summary["concepts"])})
    log.info(f"emergence: analysed {len(summary['targets'])} targets in {summary['wall_s']:.1f} s")
    return summary

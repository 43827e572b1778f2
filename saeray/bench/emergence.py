"""``saeray bench emergence``: the emergence job's findings as figures.

Runs the spec's audit (a finished run recomputes nothing) and prints, from ``emergence/summary.json``:
per concept and size the emergence step, per concept the scale threshold at the last checkpoint,
the re-activations, each behaviour's step beside its concepts' emergence steps, and the time the
audit took in this call and the job's time from the run's creation to its analysis."""
from __future__ import annotations

import time


def run_bench(spec_path: str = "jobs/storyworld-emergence.yaml", address: str | None = None) -> dict:
    from ..errors import InputError
    from ..run.audit import run_audit
    from ..spec import load_spec

    spec = load_spec(spec_path)
    if spec.emergence is None:
        raise InputError(f"{spec_path}: the spec has no emergence section; add one (e.g. emergence: {{}}) or use "
                         "jobs/storyworld-emergence.yaml")
    t0 = time.perf_counter()
    run_audit(spec, address=address)
    wall = time.perf_counter() - t0
    from ..run.audit import open_run

    rc = open_run(spec)
    s = rc.store.read_json("emergence/summary.json")
    last = str(s["steps"][-1])
    return {
        "run": rc.store.url, "models": s["models"], "steps": s["steps"], "settings": s["settings"],
        "n_targets": len(s["targets"]), "n_saes": sum(len(t["hookpoints"]) for t in s["targets"]),
        "emergence_step": s["emergence_step"],
        "scale_threshold": {c: v.get(last) for c, v in s["scale_threshold"].items()},
        "n_emerged": {m: sum(1 for c in s["concepts"] if s["emergence_step"][c].get(m) is not None)
                      for m in s["models"]},
        "n_concepts": len(s["concepts"]),
        "reactivations": s["reactivations"],
        "removed_by_step0_control": s["removed_by_step0_control"],
        "behaviour": {b: [{"model": r["model"], "behaviour_step": r["behaviour_step"], "concepts": r["concepts"]}
                          for r in per] for b, per in s.get("behaviour", {}).items()},
        "control_effect": {m: {z: len(d["removed"]) for z, d in per.items()} for m, per in s["control_effect"].items()},
        "audit_wall_s": round(wall, 1), "analysis_wall_s": s.get("wall_s"),
        # the job's time from the run's creation to its analysis (meaningful for a run made in one go)
        "job_wall_s": s.get("since_run_created_s"),
    }


def render(res: dict) -> str:
    from ..report.emergence import render_text

    s = {**res, "concepts": list(res["emergence_step"]),
         "scale_threshold": {c: {str(res["steps"][-1]): v} for c, v in res["scale_threshold"].items()}}
    head = (f"run {res['run']}: {res['n_targets']} targets, {res['n_saes']} SAEs; audit {res['audit_wall_s']} s in "
            f"this call; the job took {res['job_wall_s']} s from the run's creation to its analysis")
    return head + "\n" + render_text(s)

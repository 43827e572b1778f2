"""``saeray bench seeds``: how stable SAE features are across training seeds, per architecture.

The spec's SAEs are trained twice on the same checkpoint and the same harvested tokens, with
``sae.train.seed`` set to each of two seeds (two runs, ``<name>-seed<S>``; finished runs are
reused), and the two runs are compared by ``saeray diff``'s decoder matching: per SAE the share of
features with a mutual nearest match at cosine >= the threshold, and the mean max cosine (GBA's
MCS; the GBA paper claims more consistent features across seeds than TopK/BatchTopK). Only
harvest and training run: the figures need nothing else.
"""
from __future__ import annotations

import time


def run_bench(spec_path: str = "jobs/storyworld.yaml", seeds: tuple[int, int] = (0, 1), threshold: float = 0.7,
              address: str | None = None) -> dict:
    from ..errors import InputError
    from ..run.audit import open_run, run_targets
    from ..schedule.diff import diff_runs
    from ..spec import AuditSpec, load_spec

    spec = load_spec(spec_path)
    if spec.sae is None:
        raise InputError(f"{spec_path}: the spec has no sae section; seeds compare SAEs")
    if seeds[0] == seeds[1]:
        raise InputError("--seeds: give two different seeds, e.g. 0,1")
    d = spec.to_dict()
    d.pop("series", None)
    d.pop("alerts", None)
    t0 = time.perf_counter()
    runs = []
    for s in seeds:
        d["sae"]["train"]["seed"] = s
        rc = open_run(AuditSpec.model_validate(d), run_name=f"{spec.name}-seed{s}")
        run_targets(rc, ["train"], address)
        runs.append(rc.store)
    wall = time.perf_counter() - t0
    diff = diff_runs(runs[0], runs[1], threshold)
    rows = []
    for t in diff["targets"]:
        for s in t["saes"]:
            f = s["features"]
            rows.append({"target": t["b"], "hookpoint": s["hookpoint"], "sae": s["sae"], "arch": s["arch"],
                         "width": s["width"], "matched_share": f.get("matched_share"), "mcs": f.get("mcs")})
    by_arch: dict[str, list[dict]] = {}
    for r in rows:
        by_arch.setdefault(r["arch"], []).append(r)
    per_arch = {a: {"matched_share": sum(r["matched_share"] for r in rs) / len(rs),
                    "mcs": sum(r["mcs"] for r in rs) / len(rs), "saes": len(rs)} for a, rs in by_arch.items()}
    return {"spec": spec_path, "seeds": list(seeds), "threshold": threshold, "runs": [r.url for r in runs],
            "per_arch": per_arch, "saes": rows, "wall_s": round(wall, 1)}


def render(res: dict) -> str:
    lines = [f"features matched across SAE seeds {res['seeds'][0]} and {res['seeds'][1]} (mutual nearest decoder "
             f"direction, cosine >= {res['threshold']}), {res['spec']}:",
             f"{'arch':<10} {'SAEs':>5} {'matched':>9} {'MCS':>7}"]
    for a, v in res["per_arch"].items():
        lines.append(f"{a:<10} {v['saes']:>5} {v['matched_share']:>9.1%} {v['mcs']:>7.3f}")
    lines.append(f"{'hook point':<16} {'SAE':<22} {'matched':>9} {'MCS':>7}")
    for r in res["saes"]:
        lines.append(f"{r['hookpoint']:<16} {r['sae']:<22} {r['matched_share']:>9.1%} {r['mcs']:>7.3f}")
    lines.append(f"harvest + training of both runs: {res['wall_s']} s in this call")
    return "\n".join(lines)

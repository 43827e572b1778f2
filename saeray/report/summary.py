"""``<run>/report/summary.json``: one flat row per SAE of every target (what people sort and plot;
each row carries ``model`` and ``revision``) plus per-target facts and stage wall times. Built from
the manifest alone, so it can be rebuilt at any time."""
from __future__ import annotations

from ..evaluate.concepts import F1_FOUND
from ..manifest import stage_result

SAE_FIELDS = ("model", "revision", "hookpoint", "arch", "width", "k", "l1", "l0", "fvu", "ce_loss_recovered", "kl",
              "dead_frac", "dense_frac", f"concepts_f1_{F1_FOUND}", "n_concepts", "mean_best_f1", "loss_clean",
              "loss_zero", "loss_sae", "train_tokens", "train_tokens_per_s", "path")


def _result(t: dict, stage: str) -> dict:
    return stage_result(t, stage) or {}


def sae_rows(manifest_data: dict, store_url: str) -> list[dict]:
    rows = []
    for ti, (tid, t) in enumerate(manifest_data.get("targets", {}).items()):
        order = {hp: i for i, hp in enumerate(_result(t, "harvest").get("hookpoints", []))}
        ev = _result(t, "evaluate").get("saes", {})
        for hp, saes in _result(t, "train").get("saes", {}).items():
            for name, tr in saes.items():
                e = ev.get(hp, {}).get(name, {})
                row = {"target": tid, "model": t["model"], "revision": t["revision"], "hookpoint": hp, "name": name,
                       "arch": tr["arch"], "width": tr["width"], "k": tr.get("k"), "l1": tr.get("l1"),
                       # what sets apart two variants of one arch, width and knob (GBA's htf/ltf)
                       "opts": ", ".join(f"{o} {v:g}" for o, v in sorted(tr["opts"].items())) if tr.get("opts") else None,
                       "train_tokens": tr.get("tokens"), "train_tokens_per_s": tr.get("tokens_per_s"),
                       "path": f"{store_url}/{t['folder']}/{tr['path']}"}
                for k in SAE_FIELDS:
                    if k not in row:
                        row[k] = e.get(k)
                row["_order"] = (ti, order.get(hp, 1 << 30), hp, tr["arch"], tr["width"])
                rows.append(row)
    rows.sort(key=lambda r: r["_order"])
    for r in rows:
        del r["_order"]
    return rows


def build_summary(manifest_data: dict, store_url: str) -> dict:
    targets = []
    for tid, t in manifest_data.get("targets", {}).items():
        targets.append({"target": tid, "model": t["model"], "revision": t["revision"], "folder": t["folder"],
                        "harvest_rows": _result(t, "harvest").get("rows"),
                        "hookpoints": _result(t, "harvest").get("hookpoints", []),
                        "loss_clean": _result(t, "evaluate").get("loss_clean")})
    walls = {tid: {n: s.get("wall_s") for n, s in t.get("stages", {}).items()}
             for tid, t in manifest_data.get("targets", {}).items()}
    walls["report"] = manifest_data.get("stages", {}).get("report", {}).get("wall_s")
    if "emergence" in manifest_data.get("stages", {}):
        walls["emergence"] = manifest_data["stages"]["emergence"].get("wall_s")
    sweeps = {tid: _result(t, "sweeps").get("sweeps") for tid, t in manifest_data.get("targets", {}).items()}
    return {"run": manifest_data["run"], "store": store_url, "spec_hash": manifest_data.get("spec_hash"),
            "targets": targets, "stage_wall_s": walls, "saes": sae_rows(manifest_data, store_url),
            "sweeps": {tid: s for tid, s in sweeps.items() if s}}

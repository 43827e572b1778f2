"""``<run>/report/summary.json``: one flat row per SAE (what people sort and plot) plus the run's
stage wall times. Built from the manifest alone, so it can be rebuilt at any time."""
from __future__ import annotations

from ..evaluate.concepts import F1_FOUND

SAE_FIELDS = ("hookpoint", "arch", "width", "k", "l1", "l0", "fvu", "ce_loss_recovered", "kl", "dead_frac",
              "dense_frac", f"concepts_f1_{F1_FOUND}", "n_concepts", "mean_best_f1", "loss_clean", "loss_zero",
              "loss_sae", "train_tokens", "train_tokens_per_s", "path")


def sae_rows(manifest_data: dict) -> list[dict]:
    train = manifest_data.get("train", {}).get("units", {})
    ev = manifest_data.get("evaluate", {}).get("saes", {})
    rows = []
    for hp, unit in train.items():
        for name, t in unit.get("saes", {}).items():
            e = ev.get(hp, {}).get(name, {})
            row = {"hookpoint": hp, "name": name, "arch": t["arch"], "width": t["width"], "k": t.get("k"),
                   "l1": t.get("l1"), "train_tokens": t.get("tokens"), "train_tokens_per_s": t.get("tokens_per_s"),
                   "path": t["path"]}
            for k in SAE_FIELDS:
                if k not in row:
                    row[k] = e.get(k)
            rows.append(row)
    order = {hp: i for i, hp in enumerate(manifest_data.get("harvest", {}).get("hookpoints", []))}
    rows.sort(key=lambda r: (order.get(r["hookpoint"], 1 << 30), r["hookpoint"], r["arch"], r["width"]))
    return rows


def build_summary(manifest_data: dict, store_url: str) -> dict:
    stages = manifest_data.get("stages", {})
    return {
        "run": manifest_data["run"], "store": store_url, "spec_hash": manifest_data.get("spec_hash"),
        "model": manifest_data.get("harvest", {}).get("model"),
        "revision": manifest_data.get("harvest", {}).get("revision"),
        "harvest_rows": manifest_data.get("harvest", {}).get("totals", {}).get("rows"),
        "loss_clean": manifest_data.get("evaluate", {}).get("loss_clean"),
        "stage_wall_s": {n: s.get("wall_s") for n, s in stages.items()},
        "saes": sae_rows(manifest_data),
    }

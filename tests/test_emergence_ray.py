"""The emergence job on a real local Ray over the test zoo (two sizes x three checkpoints x every
layer): one audit harvests, trains (warm-started, one Ray task per hook point), scores presence
and analyses; the report and PNGs show it; `saeray bench emergence --json` prints it; re-running a
finished job recomputes nothing; a driver killed mid-way and re-run ends with the same findings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from saeray.run.audit import run_audit
from saeray.spec import parse_spec

from conftest import kill_cli_midway

pytestmark = pytest.mark.slow

REVS = ["step0", "step8", "step64"]


def spec_dict(store: str) -> dict:
    return {"name": "em", "model": [{"name": "storyworld-tiny-1l", "revisions": REVS},
                                    {"name": "storyworld-tiny-2l", "revisions": REVS}],
            "corpus": {"n_docs": 64, "context_len": 64, "heldout_docs": 96},
            "hookpoints": ["resid_post.*"], "harvest": {"batch_size": 32, "unit_contexts": 32},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    "train": {"tokens": 6000, "batch_size": 128, "launcher": "task", "warm_start": True}},
            "evaluation": {"ce_loss": False, "concepts": False},
            "emergence": {"max_tokens": 4000, "probe_k": [1, 4]},
            "store": store, "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5},
                                          "eval": {"num_cpus": 0.5}}}


def _findings(run: Path) -> dict:
    s = json.loads((run / "emergence" / "summary.json").read_text())
    return {k: s[k] for k in ("emergence_step", "scale_threshold", "reactivations", "present")}


def _presence_records(run: Path) -> int:
    n = 0
    for t in (run / "targets").glob("*"):
        d = t / "_records"
        n += len(list((d / "presence").glob("*.json"))) if (d / "presence").is_dir() else 0
        if (d / "presence.json").exists():
            n += len(json.loads((d / "presence.json").read_text()))
    return n


def test_emergence_job_end_to_end_rerun_and_kill(ray_local, tmp_path):
    d = spec_dict(str(tmp_path / "ref"))
    run_audit(parse_spec(json.dumps(d)))
    run = tmp_path / "ref" / "em"
    s = json.loads((run / "emergence" / "summary.json").read_text())
    assert s["models"] == ["storyworld-tiny-1l", "storyworld-tiny-2l"] and s["steps"] == [0, 8, 64]
    assert len(s["concepts"]) >= 10
    # every emergence step agrees with the presence it is computed from
    present = {(p["concept"], p["model"], p["step"]) for p in s["present"]}
    for c, per in s["emergence_step"].items():
        for m, step in per.items():
            if step is not None:
                assert all((c, m, x) in present for x in s["steps"] if x >= step)
                assert step > 0, "step 0 is the control, never an emergence step"
    # presence rows: every concept x measure at every layer of every target
    scores = pq.read_table(run / "emergence" / "scores.parquet").to_pylist()
    layers = {"storyworld-tiny-1l": 1, "storyworld-tiny-2l": 2}
    assert {r["measure"] for r in scores} == {"latent", "sparse", "linear"}
    assert len({(r["model"], r["step"], r["layer"]) for r in scores}) == 3 * (1 + 2)
    assert all(0 <= r["auroc"] <= 1 for r in scores)
    # the linear probe on raw activations is the ceiling the single latent does not beat by much
    lin = {(r["model"], r["step"], r["layer"], r["concept"]): r["auroc"] for r in scores if r["measure"] == "linear"}
    lat = {(r["model"], r["step"], r["layer"], r["concept"]): r["auroc"] for r in scores if r["measure"] == "latent"}
    assert sum(lin[k] >= lat[k] - 0.02 for k in lat) / len(lat) > 0.9
    # warm-started SAEs keep their indices along checkpoints: matched pairs mostly keep theirs
    time_rows = [r for r in s["matching"] if r["axis"] == "time"]
    assert len(time_rows) == sum(layers.values()) * 2
    assert all(r["same_index"] > 0.9 for r in time_rows if r["matched_one_to_one"] > 0.1)
    assert any(r["matched_one_to_one"] > 0.1 for r in time_rows)
    assert {r["axis"] for r in s["matching"]} == {"time", "layer"}
    for b in ("fact_recall", "copying"):
        assert [r["model"] for r in s["behaviour"][b]] == list(layers)
    for name in ["emergence_curves.png", "scale_curves.png", "behaviour.png"] + [f"layer_maps_{m}.png" for m in layers]:
        assert (run / "emergence" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report" / "emergence.html").read_text()
    assert 'href="emergence.html"' in (run / "report" / "index.html").read_text()
    assert "Emergence across checkpoints" in page
    from browser import check_all_pages

    pages = check_all_pages(run / "report", "emergence")
    assert {"index.html", "emergence.html"} <= set(pages)
    assert len(list((run / "report" / "dashboards").glob("*/*/*.html"))) == 9      # 6 targets, 1 + 2 layers and "Time thresholds" in page and page.count("data:image/png") >= 5

    # re-running the finished job recomputes nothing
    files = [p for p in run.rglob("*") if p.is_file() and ("emergence" in p.parts or p.suffix == ".safetensors")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    run_audit(parse_spec(json.dumps(d)))
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # the bench prints the findings as one JSON line
    spec_file = tmp_path / "ref.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    gcs = ray_local.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "saeray", "--address", gcs, "bench", "emergence", "--spec",
                          str(spec_file), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["emergence_step"] == s["emergence_step"] and res["n_saes"] == 3 * 3
    assert set(res["behaviour"]) == {"fact_recall", "copying"}

    # the driver SIGKILLed once some targets have scored presence, then re-run: the same findings
    d2 = spec_dict(str(tmp_path / "kd"))
    f2 = tmp_path / "kd.yaml"
    f2.write_text(yaml.safe_dump(d2))
    kd = tmp_path / "kd" / "em"
    alive, n = kill_cli_midway(["--address", gcs, "audit", str(f2)], lambda: _presence_records(kd), 2, timeout=600)
    assert alive and 2 <= n < 9, f"killed with {n} of 9 hook points scored"
    run_audit(parse_spec(json.dumps(d2)))
    assert _findings(kd) == _findings(run)

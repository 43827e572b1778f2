"""Scheduled series end to end on real components: nightly audits of a checkpoint folder that gains
a newer zoo checkpoint every night, run by the CLI against a Ray head on 127.0.0.1 with the store on
S3 (moto on loopback) and the alert webhook a receiver on 127.0.0.1; and ``saeray diff`` of a run
with itself and of two runs that differ only in the SAE seed, its section in the report checked in
the real browser."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import VENV_BIN, WebhookReceiver
from saeray.store import Store

pytestmark = pytest.mark.slow
NIGHTS = [("2026-12-01", "step8"), ("2026-12-02", "step16"), ("2026-12-03", "step32"), ("2026-12-04", "step64")]


def saeray(*args: str, env: dict, timeout: float = 420) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(VENV_BIN / "saeray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        out = json.loads(last)
    except json.JSONDecodeError:
        out = None
    return r.returncode, out, r.stdout + r.stderr


def test_nightly_series_on_a_ray_head_and_s3(ray_head, s3_url, tmp_path):
    from saeray.storyworld.zoo import ZooConfig, build_zoo

    zoo = Path(build_zoo(ZooConfig.tiny())) / "storyworld-tiny-2l"
    model = tmp_path / "checkpoints"          # the training job's output folder: one more checkpoint per night
    model.mkdir()
    _, env, _ = ray_head
    hook = WebhookReceiver()
    env = {**env, "SAERAY_ALERT_WEBHOOK": hook.url}
    address = f"127.0.0.1:{env['RAY_PORT']}"
    spec = tmp_path / "nightly.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: nightly
        model: {{name: {model}, revisions: [latest]}}
        corpus: {{n_docs: 48, context_len: 64, heldout_docs: 16}}
        hookpoints: ["resid_post.1"]
        harvest: {{batch_size: 16, unit_contexts: 16}}
        sae:
          architectures: [{{arch: topk, width: 64, k: 4}}]
          train: {{tokens: 4000, batch_size: 256, launcher: task}}
        evaluation: {{batch_size: 16, probes: false}}
        dashboards: {{enabled: false}}
        # set to trip: SAEs trained this briefly stay near their (seeded) start, so at cosine 0.7 every
        # feature would match; at 0.95 a newer checkpoint's SAE does not keep every decoder direction
        series: {{keep_activations: 2, match_threshold: 0.95}}
        alerts: {{matched_share_below: 1.0}}
        store: {s3_url}
        resources: {{harvest: {{num_cpus: 0.5}}, train: {{num_cpus: 0.5}}, eval: {{num_cpus: 0.5}}}}
        """))
    series = Store.open(s3_url) / "nightly"
    try:
        codes = []
        for i, (date, step) in enumerate(NIGHTS[:3]):
            (model / step).symlink_to(zoo / step)
            rc, out, log = saeray("--address", address, "audit", str(spec), "--date", date, "--json", env=env)
            assert rc in (0, 3), log[-3000:]
            codes.append(rc)
            assert out["run_name"] == f"nightly-{date}-{step}" and out["previous"] == (
                None if i == 0 else f"nightly-{NIGHTS[i - 1][0]}-{NIGHTS[i - 1][1]}")
        # the first night has nothing to compare with; every later one trips, says so and posts
        assert codes == [0, 3, 3]
        assert "ALERT matched_share_below" in log
        idx = series.read_json("index.json")
        runs = [f"nightly-{d}-{s}" for d, s in NIGHTS]
        assert [e["run"] for e in idx["runs"]] == runs[:3]
        assert [e["status"] for e in idx["runs"]] == ["done", "alert", "alert"]
        assert [e["targets"][0]["revision"] for e in idx["runs"]] == ["step8", "step16", "step32"]
        assert [e["activations"] for e in idx["runs"]] == [False, True, True]
        assert all(series.exists(f"runs/{r}/manifest.json") for r in runs[:3])
        assert [p["run"] for _, p in hook.posts] == runs[1:3]
        path, body = hook.posts[-1]
        assert path == "/hooks/T0K3N-secret" and body["previous"] == runs[1] and body["n_alerts"] >= 1
        assert body["alerts"][0]["rule"] == "matched_share_below" and body["report"].startswith(s3_url)
        # diff --previous on the third night compares it with the second
        rc, d, log = saeray("diff", "--previous", f"{s3_url}/nightly/runs/{runs[2]}", "--json", env=env)
        assert rc == 0, log[-3000:]
        assert d["a"]["run"] == runs[1] and d["b"]["run"] == runs[2]
        (t,) = d["targets"]
        assert (t["revision_a"], t["revision_b"]) == ("step16", "step32")
        assert t["saes"][0]["features"]["matched_share"] < 1.0
        assert d["targets"] == series.read_json(f"runs/{runs[2]}/diff/previous.json")["targets"]
        html = series.read_bytes(f"runs/{runs[2]}/report/diff.html").decode()
        assert f"Changes since {runs[1]}" in html and "class=alert" in html and "features matched in the previous" in html
        # a retried submission of the third night resumes that run: no new folder, no second post
        rc, out, log = saeray("--address", address, "audit", str(spec), "--date", NIGHTS[2][0], "--json", env=env)
        assert rc == 3 and out["run_name"] == runs[2], log[-3000:]
        assert "already received these alerts" in log
        assert len(hook.posts) == 2 and len(series.read_json("index.json")["runs"]) == 3
        # the fourth night: retention keeps activations for the newest two runs only
        (model / NIGHTS[3][1]).symlink_to(zoo / NIGHTS[3][1])
        rc, out, log = saeray("--address", address, "audit", str(spec), "--date", NIGHTS[3][0], "--json", env=env)
        assert rc == 3, log[-3000:]
        assert out["pruned"] == [runs[1]]          # the first night's went when the third finished
        idx = series.read_json("index.json")
        assert [e["activations"] for e in idx["runs"]] == [False, False, True, True]
        for r in runs:
            target = series / f"runs/{r}/targets/checkpoints@{r.rsplit('-', 1)[1]}"
            assert target.exists("acts/resid_post.1") == (r in runs[2:]), r
            assert target.exists("saes/resid_post.1/topk-w64-k4/sae_weights.safetensors"), r
            assert target.exists("eval.json") and series.exists(f"runs/{r}/report/index.html"), r
        # the index, for people
        rc, out, log = saeray("series", f"{s3_url}/nightly", "--json", env=env)
        assert rc == 0 and [e["run"] for e in out["runs"]] == runs
        rc, _, log = saeray("series", f"{s3_url}/nightly", env=env)
        assert "deleted" in log and runs[3] in log
        # a pruned run's report still rebuilds from the store
        rc, out, log = saeray("report", f"{s3_url}/nightly/runs/{runs[0]}", "--json", env=env)
        assert rc == 0 and out["saes"] == 1, log[-3000:]
    finally:
        hook.close()


def _spec(model: str, store: str, name: str, seed: int, prompts: str) -> dict:
    return {"name": name, "model": {"name": model},
            "corpus": {"n_docs": 64, "context_len": 64, "heldout_docs": 32},
            "hookpoints": ["resid_post.1", "resid_post.3"],
            "harvest": {"batch_size": 16, "unit_contexts": 32},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    "train": {"tokens": 6000, "batch_size": 200, "seed": seed, "launcher": "task"}},
            "evaluation": {"batch_size": 16}, "dashboards": {"enabled": True},
            "sweeps": [{"name": "g", "prompts": [prompts], "n_prompts": 8, "ks": [1, 2], "exact_batch": 16}],
            "store": store, "resources": {k: {"num_cpus": 0.5} for k in ("harvest", "train", "eval", "sweeps")}}


def test_diff_of_a_run_with_itself_and_across_seeds(ray_local, tiny_model, tmp_path):
    from browser import check_all_pages
    from test_sweeps_ray import _prompts

    from saeray.run.audit import run_audit
    from saeray.schedule.diff import diff_runs, no_change
    from saeray.spec import parse_spec

    prompts = _prompts(tiny_model, tmp_path / "q.jsonl", n=8)
    store = tmp_path / "store"
    for seed in (0, 1):
        run_audit(parse_spec(json.dumps(_spec(tiny_model, str(store), f"seed{seed}", seed, prompts))))
    a = Store.open(str(store / "seed0"))
    same = diff_runs(a, a)
    assert no_change(same)
    for s in same["targets"][0]["saes"]:
        assert s["features"]["matched_share"] == 1.0 and s["features"]["mcs"] == pytest.approx(1.0, abs=1e-5)
        assert s["influential"]["overlap"] == 1.0 and s["influential"]["top_b"]
    assert same["targets"][0]["concepts"] and not any(c["lost"] for c in same["targets"][0]["concepts"])
    # two seeds: the CLI prints the table and the JSON, and --save puts the section in the newer run's report
    env = dict(os.environ)
    rc, d, log = saeray("diff", str(store / "seed0"), str(store / "seed1"), "--save", "--json", env=env)
    assert rc == 0, log[-3000:]
    assert not no_change(d)
    rows = d["targets"][0]["saes"]
    assert {r["hookpoint"] for r in rows} == {"resid_post.1", "resid_post.3"}
    for r in rows:
        f = r["features"]
        assert 0 <= f["matched_share"] < 1 and f["born"] == f["width_b"] - f["matched"] and 0 < f["mcs"] < 1
        assert all(r["metrics"][m]["delta"] is not None for m in ("fvu", "l0", "ce_loss_recovered", "kl"))
        assert "influential" in r and "most_changed_density" in f
    assert "matched" in log and "seed0" in log
    html = (store / "seed1" / "report" / "diff.html").read_text()
    assert "Changes since seed0" in html and "No alert threshold was crossed" in html
    pages = check_all_pages(store / "seed1" / "report", "diff")
    assert "Changes" in pages["index.html"] and "diff.html" in pages["index.html"]
    # --previous needs a series
    rc, _, log = saeray("diff", "--previous", str(store / "seed1"), env=env)
    assert rc == 2 and "not part of a series" in log

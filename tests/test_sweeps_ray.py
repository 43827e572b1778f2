"""Sweeps on a real local Ray: the stage writes every table once, a pool worker killed mid-sweep is
retried, a driver killed mid-sweep and re-run finishes with exactly the rows of an uninterrupted
sweep (none lost, none duplicated), the report shows the sweep, and bad sweep specs fail before
anything runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from saeray.errors import InputError
from saeray.run.audit import open_run, run_audit, run_targets
from saeray.spec import parse_spec

from conftest import kill_cli_midway, run_and_kill_child

pytestmark = pytest.mark.slow
TABLES = ("prompts", "latents", "masking", "steering")


def _prompts(model: str, path: Path, n: int = 24) -> str:
    """Prompts the tiny random model 'knows': its own greedy next word (random weights know no facts)."""
    import torch

    from saeray.models.shard import Stage
    from saeray.storyworld.generator import generate_words
    from saeray.storyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    stage = Stage.from_pretrained(model, (0, 4))
    lines, i = [], 0
    while len(lines) < n:
        words = generate_words(i, 7, "heldout")[: 10 + i % 20]
        i += 1
        ids = [tok.bos_token_id] + tok(" ".join(words), add_special_tokens=False).input_ids
        with torch.no_grad():
            nxt = int(stage(torch.tensor([ids])).output[0, -1].argmax())
        word = tok.convert_ids_to_tokens(nxt)
        if word.isalpha():
            lines.append(json.dumps({"id": f"q{i:03d}", "prompt": " ".join(words), "answer": word}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def spec_dict(model: str, store: str, prompt_file: str, name: str = "sw", **sweep) -> dict:
    return {"name": name, "model": {"name": model},
            "corpus": {"n_docs": 64, "context_len": 64, "heldout_docs": 32, "skip_first": 1},
            "hookpoints": ["resid_post.1", "resid_post.2"],
            "harvest": {"batch_size": 16, "unit_contexts": 32},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}, {"arch": "relu", "width": 64, "l1": 1.0}],
                    # one Ray task per hook point: the sweeps are under test here, and Ray Train's
                    # 10-20 s start-up per run is covered by test_audit and test_crash_consistency
                    "train": {"tokens": 6000, "batch_size": 200, "launcher": "task"}},
            "evaluation": {"batch_size": 16, "probes": False}, "dashboards": {"enabled": sweep.pop("dashboards", False)},
            "sweeps": [{"name": "g", "prompts": [prompt_file], "n_prompts": 24, "prompts_per_item": 1,
                        "hookpoints": ["resid_post.1"], "saes": ["topk"], "ks": [1, 2, "50%"], "exact_batch": 16,
                        **sweep}],
            "store": store,
            "resources": {k: {"num_cpus": 0.5} for k in ("harvest", "train", "eval", "sweeps")}}


def _tables(root: Path) -> dict:
    base = root / "targets" / "neox@main" / "sweeps" / "g"
    out = {}
    for t in TABLES:
        tab = ds.dataset(str(base / t), format="parquet").to_table()
        tab = tab.drop_columns([c for c in tab.column_names if c.startswith("t_")])   # wall times
        out[t] = sorted(json.dumps(r, sort_keys=True) for r in tab.to_pylist())
    return out


def _records(root: Path) -> int:
    d = root / "targets" / "neox@main" / "sweeps" / "g" / "_records" / "items"
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


def test_sweep_killed_and_rerun_equals_uninterrupted(ray_local, tiny_model, tmp_path):
    prompts = _prompts(tiny_model, tmp_path / "q.jsonl")
    ref_spec = parse_spec(json.dumps(spec_dict(tiny_model, str(tmp_path / "ref"), prompts)))
    out = run_targets(open_run(ref_spec), ["sweeps"])["neox@main"]["sweeps"].sweeps["g"]
    ref = _tables(tmp_path / "ref" / "sw")
    assert len(ref["prompts"]) == 24 and sum('"correct": true' in r for r in ref["prompts"]) == 24
    assert len(ref["latents"]) > 24 and len(ref["masking"]) == 24 * (1 + 2 * 2 * 3)
    assert len(ref["steering"]) == 24 * 2 * 2 * 3
    row = out["agreement"][0]
    assert row["correct"] == 24 and -1 <= row["gradsae_spearman"] <= 1 and row["exact_latents_per_s"] > 0
    assert {(m["method"], m["side"], m["k"]) for m in out["masking"]} >= {("gradsae", "top", "50%"), ("none", "none", "0")}

    # (1) a pool worker SIGKILLed mid-sweep: Ray restarts it, the pool re-runs its item
    d1 = spec_dict(tiny_model, str(tmp_path / "kw"), prompts)
    rc1 = open_run(parse_spec(json.dumps(d1)))
    run_targets(rc1, ["train"])
    killed, res = run_and_kill_child(lambda: run_targets(rc1, ["sweeps"]), "PoolWorker",
                                     ready=lambda: _records(tmp_path / "kw" / "sw") >= 2, timeout=240, join_timeout=600)
    assert killed is not None, "the worker must be killed mid-sweep for this test to mean anything"
    assert "err" not in res, res.get("err")
    assert _tables(tmp_path / "kw" / "sw") == ref

    # (2) the driver SIGKILLed mid-sweep, then the sweep run again
    d2 = spec_dict(tiny_model, str(tmp_path / "kd"), prompts)
    rc2 = open_run(parse_spec(json.dumps(d2)))
    run_targets(rc2, ["train"])
    spec_file = tmp_path / "kd.yaml"
    spec_file.write_text(yaml.safe_dump(d2))
    gcs = ray_local.get_runtime_context().gcs_address
    root = tmp_path / "kd" / "sw"
    alive, done_at_kill = kill_cli_midway(["--address", gcs, "sweep", str(spec_file)], lambda: _records(root), 3)
    assert alive and 3 <= done_at_kill < 24, f"killed with {done_at_kill} of 24 items done"
    run_targets(open_run(parse_spec(json.dumps(d2))), ["sweeps"])
    assert _tables(root) == ref


def test_sweep_in_the_audit_report_and_added_to_a_finished_audit(ray_local, tiny_model, tmp_path):
    prompts = _prompts(tiny_model, tmp_path / "q.jsonl", n=6)
    d = spec_dict(tiny_model, str(tmp_path / "s"), prompts, n_prompts=6, prompts_per_item=3, dashboards=True)
    first = dict(d, sweeps=[])
    run_audit(parse_spec(json.dumps(first)))
    root = tmp_path / "s" / "sw"
    assert not (root / "targets" / "neox@main" / "sweeps").exists()
    # a sweep added to the finished audit: only the sweep runs (SAEs untouched), the report shows it
    sae = root / "targets" / "neox@main" / "saes" / "resid_post.1" / "topk-w64-k4" / "sae_weights.safetensors"
    mtime = sae.stat().st_mtime
    summary = run_audit(parse_spec(json.dumps(d)))
    assert sae.stat().st_mtime == mtime
    assert summary["sweeps"]["neox@main"]["g"]["agreement"][0]["prompts"] == 6
    html = (root / "report" / "sweep-g.html").read_text()
    assert 'href="sweep-g.html"' in (root / "report" / "index.html").read_text()
    assert "Sweep g in neox@main" in html and 'alt="GradSAE score against exact ablation effect"' in html
    from browser import check_all_pages

    pages = check_all_pages(root / "report", "gradsae")
    assert {"index.html", "sweep-g.html"} <= set(pages) and any(p.startswith("dashboards/") for p in pages)
    # the dashboards of the swept SAE carry each latent's GradSAE influence and planted-label explanation
    batch = json.loads(next((root / "targets" / "neox@main" / "dashboards").glob("resid_post.1/topk-w64-k4/batch-*.json"))
                       .read_text())
    feats = [f["saeray"] for f in batch["features"]]
    assert all(f["explainer"] == "planted labels" and f["explanation"] for f in feats)
    assert any(f.get("influence", {}).get("gradsae", 0) > 0 for f in feats) and "GradSAE ρ" in html and "Masking: topk-w64-k4 on q" in html
    # changing a finished sweep's settings is refused, naming the field; a new name is accepted
    changed = dict(d, sweeps=[dict(d["sweeps"][0], ks=[1])])
    with pytest.raises(InputError, match=r"sweep 'g' .* \(sweeps\.ks changed\); give the sweep a new name"):
        run_audit(parse_spec(json.dumps(changed)))


@pytest.mark.parametrize("sweep,msg", [
    ({"hookpoints": ["resid_post.3"]}, r"sweeps\[0\] \(g\)\.hookpoints: 'resid_post.3' is not one of the audit's hook points"),
    ({"saes": ["gated"]}, r"sweeps\[0\] \(g\)\.saes: no SAE 'gated'"),
    ({"prompts": ["storyworld-facts"]}, r"storyworld-facts needs a storyworld model and corpus"),
    ({"prompts": ["nope.jsonl"]}, r"nope.jsonl: no such file"),
])
def test_bad_sweeps_fail_before_anything_runs(tiny_model, tmp_path, sweep, msg):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"prompt": "a", "answer": "b"}\n')
    d = spec_dict(tiny_model, str(tmp_path / "s"), str(prompts), **sweep)
    if sweep.get("prompts") == ["storyworld-facts"]:
        text = tmp_path / "text.jsonl"         # a text corpus (long enough), not storyworld
        text.write_text("".join(json.dumps({"text": "at the farm . mia lives in quito . " * 3}) + "\n" for _ in range(400)))
        d["corpus"]["source"] = str(text)
    with pytest.raises(InputError, match=msg):
        run_targets(open_run(parse_spec(json.dumps(d))), ["sweeps"])
    assert not (tmp_path / "s").exists()


def test_cli_sweep_without_sweeps_exits_2(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nmodel: {name: storyworld-4l}\nhookpoints: [resid_post.0]\n")
    r = subprocess.run([sys.executable, "-m", "saeray", "sweep", str(spec)], capture_output=True, text=True)
    assert r.returncode == 2 and "no 'sweeps:' section" in r.stderr
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\nmodel: {name: storyworld-4l}\nhookpoints: [resid_post.0]\n"
                   "sweeps: [{name: a, ks: ['150%']}]\n")
    r = subprocess.run([sys.executable, "-m", "saeray", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "sweeps[0].ks" in r.stderr.replace("sweeps.0.ks", "sweeps[0].ks")

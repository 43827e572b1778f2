"""The context look-up sweep on a real local Ray: every table, the explanations and delphi's files
are written; the sweep needs no SAEs (nothing is harvested or trained); a driver killed mid-sweep
and re-run ends with exactly the rows of an uninterrupted sweep; a run against the real
`transformers serve` writes explanations and scores; bad look-up specs fail before anything runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from saeray.errors import InputError
from saeray.run.audit import open_run, run_targets
from saeray.spec import parse_spec

from conftest import kill_cli_midway

pytestmark = pytest.mark.slow
TABLES = ("neurons", "activating", "pairs", "ablation", "explanations", "classifications", "induction")


def spec_dict(model: str, store: str, **lookups) -> dict:
    opt = {"layers": [3], "n_per_layer": 4, "n_random": 2, "neurons_per_item": 2, "n_prompts": 8, "n_test": 6,
           "explain_contexts": 48, "test_contexts": 32, "copy_targets": True, **lookups}
    return {"name": "lk", "model": {"name": model},
            "corpus": {"n_docs": 64, "context_len": 64, "heldout_docs": 32},
            "hookpoints": ["resid_post.1"],
            "sweeps": [{"name": "l", "method": "lookups", "lookups": opt}],
            "store": store, "resources": {"sweeps": {"num_cpus": 0.5}}}


def _base(root: Path) -> Path:
    return root / "lk" / "targets" / "neox@main" / "sweeps" / "l"


def _tables(root: Path) -> dict:
    out = {}
    for t in TABLES:
        tab = ds.dataset(str(_base(root) / t), format="parquet").to_table()
        out[t] = sorted(json.dumps(r, sort_keys=True) for r in tab.to_pylist())
    return out


def _records(root: Path, kind: str = "items") -> int:
    """Finished items: per-item record files, and those folded into ``_records/<kind>.json``."""
    d = _base(root) / "_records"
    units = {p.stem for p in (d / kind).glob("*.json")} if (d / kind).is_dir() else set()
    folded = set(json.loads((d / f"{kind}.json").read_text())) if (d / f"{kind}.json").exists() else set()
    return len(units | folded)


def test_lookup_sweep_writes_its_tables_and_a_killed_driver_resumes(ray_local, tiny_model, tmp_path):
    d = spec_dict(tiny_model, str(tmp_path / "ref"))
    out = run_targets(open_run(parse_spec(json.dumps(d))), ["sweeps"])["neox@main"]["sweeps"].sweeps["l"]
    root = tmp_path / "ref"
    assert not (root / "lk" / "targets" / "neox@main" / "saes").exists(), "look-ups need no SAEs"
    assert not (root / "lk" / "targets" / "neox@main" / "harvest").exists()
    ref = _tables(root)
    neurons = [json.loads(r) for r in ref["neurons"]]
    assert sorted(n["set"] for n in neurons) == ["copy"] * 4 + ["random"] * 2 + ["top"] * 4
    assert all(n["layer"] == 3 for n in neurons) and len(ref["induction"]) == 4 * 4
    act = [json.loads(r) for r in ref["activating"]]
    assert {a["split"] for a in act} == {"explain", "test"}
    assert all(len(a["head_scores"]) == 3 * 4 and a["tokens"][0] == "<bos>" for a in act)
    pairs = [json.loads(r) for r in ref["pairs"]]
    expl = [json.loads(r) for r in ref["explanations"]]
    assert len(expl) == len(pairs) > 0, "the tiny model must give pairs for this test to mean anything"
    scored = [e for e in expl if not e["skipped"]]
    assert scored and all(0 <= e["score"] <= 1 and "(rule: " in e["explanation"] for e in scored)
    assert all(math.isnan(e["score"]) and e["explanation"] == "" for e in expl if e["skipped"])
    assert len(ref["ablation"]) == sum(len([a for a in act if (a["set"], a["neuron"]) == (p["set"], p["neuron"])])
                                       for p in pairs)
    delphi = list((_base(root) / "delphi" / "explanations").glob("*.txt"))
    assert len(delphi) == len(scored) == len(list((_base(root) / "delphi" / "scores" / "detection").glob("*.txt")))
    top = out["sets"]["top"]
    assert top["n_neurons"] == 4 and top["n_pairs"] == sum(p["set"] == "top" for p in pairs)
    assert set(out["sets"]) == {"top", "random", "copy"} and "induction_match" in out["sets"]["copy"]
    assert _records(root) == 1 + 2 + 1 + 2 and _records(root, "explained") == 5
    # the look-up page in a real browser: loads clean, the activating tokens marked, explanations shown
    from browser import check_all_pages

    from saeray.report.build import build_report
    from saeray.store import Store

    run = Store.open(str(root / "lk"))
    build_report(run, run.read_json("manifest.json"))
    pages = check_all_pages(root / "lk" / "report", "lookups")
    assert "<mark>" in pages["sweep-l.html"] and "(rule: " in pages["sweep-l.html"]

    # a second run finds everything done and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in _base(root).rglob("*.parquet")}
    run_targets(open_run(parse_spec(json.dumps(d))), ["sweeps"])
    assert {p: p.stat().st_mtime_ns for p in _base(root).rglob("*.parquet")} == stamps

    # the driver SIGKILLed mid-sweep, then the sweep run again: the same rows, none lost or doubled
    d2 = spec_dict(tiny_model, str(tmp_path / "kd"))
    spec_file = tmp_path / "kd.yaml"
    spec_file.write_text(yaml.safe_dump(d2))
    gcs = ray_local.get_runtime_context().gcs_address
    kd = tmp_path / "kd"
    alive, done_at_kill = kill_cli_midway(["--address", gcs, "sweep", str(spec_file)], lambda: _records(kd), 2)
    assert alive and 2 <= done_at_kill < 6, f"killed with {done_at_kill} of 6 items done"
    run_targets(open_run(parse_spec(json.dumps(d2))), ["sweeps"])
    assert _tables(kd) == ref


def test_lookup_sweep_against_a_real_server(ray_local, tiny_model, llm_server, tmp_path):
    """SmolLM2 on `transformers serve` explains and classifies: explanations and scores are written,
    every classifier answer kept (parsed or not), in the tables and in delphi's layout."""
    base_url, model_id = llm_server
    d = spec_dict(tiny_model, str(tmp_path / "s"), n_random=0, copy_targets=False, n_per_layer=2, n_test=4,
                  explainer="llm", llm={"base_url": base_url, "model": model_id, "timeout_s": 300,
                                        "max_concurrency": 2, "requests_per_s": 20})
    out = run_targets(open_run(parse_spec(json.dumps(d))), ["sweeps"])["neox@main"]["sweeps"].sweeps["l"]
    tabs = _tables(tmp_path / "s")
    expl = [json.loads(r) for r in tabs["explanations"]]
    scored = [e for e in expl if not e["skipped"]]
    assert scored, "the tiny model must give a scorable pair for this test to mean anything"
    for e in scored:
        assert e["explainer"] == f"llm:{model_id}" and len(e["explanation"].split()) >= 3
        assert e["tp"] + e["fn"] + e["tn"] + e["fp"] == e["n_test"] and 0 <= e["score"] <= 1
    cls = [json.loads(r) for r in tabs["classifications"]]
    assert len(cls) == sum(e["n_test"] for e in scored)
    assert sum(c["prediction"] is None for c in cls) == sum(e["unparsed"] for e in scored)
    assert out["sets"]["top"]["n_scored"] == len(scored)
    assert len(list((_base(tmp_path / "s") / "delphi" / "explanations").glob("*.txt"))) == len(scored)


@pytest.mark.parametrize("lookups,corpus,msg", [
    ({"layers": [0]}, None, r"sweeps\[0\] \(l\)\.lookups\.layers: \[0\] out of range"),
    ({"layers": [4]}, None, r"lookups\.layers: \[4\] out of range"),
    ({"test_contexts": 64}, None, r"lookups\.test_contexts: 64 held-out contexts .*\(corpus\.heldout_docs\)"),
    ({"copy_targets": False}, "text", r"lookups\.explainer: the offline explainer reads storyworld"),
    ({"explainer": "llm", "llm": {"serve": "/nope"}}, None, r"lookups\.llm\.serve: '/nope' is neither"),
])
def test_bad_lookup_sweeps_fail_before_anything_runs(tiny_model, tmp_path, lookups, corpus, msg):
    d = spec_dict(tiny_model, str(tmp_path / "s"), **lookups)
    if corpus == "text":
        text = tmp_path / "text.jsonl"
        text.write_text("".join(json.dumps({"text": "at the farm . mia lives in quito . " * 3}) + "\n" for _ in range(400)))
        d["corpus"]["source"] = str(text)
    with pytest.raises(InputError, match=msg):
        run_targets(open_run(parse_spec(json.dumps(d))), ["sweeps"])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("lookups,msg", [
    ({"explainer": "llm"}, r"explainer 'llm' needs an 'llm:' section"),
    ({"explainer": "llm", "llm": {"serve": "smollm2-135m-instruct", "base_url": "http://127.0.0.1:1/v1"}},
     r"serve starts its own server"),
    ({"explainer": "llm", "llm": {"base_url": "http://127.0.0.1:1/v1"}}, r"give base_url and model"),
])
def test_lookup_spec_errors_name_the_field(tiny_model, tmp_path, lookups, msg):
    d = spec_dict(tiny_model, str(tmp_path / "s"), **lookups)
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "saeray", "validate", str(spec)], capture_output=True, text=True)
    assert r.returncode == 2 and "lookups" in r.stderr and __import__("re").search(msg, r.stderr), r.stderr


def test_bench_lookups_prints_its_figures_as_strict_json(ray_local, tiny_model, tmp_path):
    d = spec_dict(tiny_model, str(tmp_path / "s"))
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    gcs = ray_local.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-m", "saeray", "--address", gcs, "bench", "lookups", "--spec", str(spec_file),
                        "--sweep", "l", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    def no_nan(c):
        raise AssertionError(f"{c} in --json output: not strict JSON")
    res = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=no_nan)
    for k in ("n_neurons", "n_pairs", "explanation_score_mean", "control_score_mean", "ks_d", "ks_p", "induction_match",
              "copy_prompt_share", "explanation_score_parsed_mean"):
        assert k in res, k
    tabs = {t: [json.loads(x) for x in rows] for t, rows in _tables(tmp_path / "s").items()}
    assert res["n_neurons"] == 4 and res["n_pairs"] == sum(p["set"] == "top" for p in tabs["pairs"])
    scored = [e["score"] for e in tabs["explanations"] if e["set"] == "top" and not e["skipped"]]
    assert res["explanation_score_mean"] == pytest.approx(sum(scored) / len(scored)) if scored else \
        res["explanation_score_mean"] is None
    assert set(res["targets"]) == {"explanation_score_mean>=0.7", "margin_over_control>=0.1", "induction_match>=0.8",
                                   "ks_p<0.01"}
    assert "Context look-ups on " in r.stdout and "neox@main, layers [3], explainer offline" in r.stdout

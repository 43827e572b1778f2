"""Runs over several targets on a real local Ray: two checkpoints of a zoo model audited side by
side (each harvest equal to a direct transformers forward of its own checkpoint); harvesting one
revision and then auditing another never mixes them; a driver killed in the second target's
harvest resumes without redoing the first target or losing a row."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from saeray.harvest.corpus import Corpus
from saeray.harvest.schema import acts_to_numpy
from saeray.run.audit import open_run, run_audit, run_targets
from saeray.run.records import Records
from saeray.spec import parse_spec
from saeray.store import Store

pytestmark = pytest.mark.slow
MODEL = "storyworld-tiny-2l"     # the test zoo: real checkpoints, built in seconds on first use


def spec_dict(store: str, name: str, revisions, **over) -> dict:
    return {"name": name, "model": {"name": MODEL, "revisions": revisions},
            "corpus": {"n_docs": 48, "context_len": 64, "heldout_docs": 16, **over.pop("corpus", {})},
            "hookpoints": ["resid_post.*"],
            "harvest": {"batch_size": 16, "unit_contexts": 16, "dtype": "float32", **over.pop("harvest", {})},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    # one Ray task per hook point: the targets are under test here, and Ray Train's
                    # 10-20 s start-up per run is covered by test_audit and test_crash_consistency
                    "train": {"tokens": 4000, "batch_size": 256, "launcher": "task"}},
            "evaluation": {"batch_size": 16, "probes": False}, "dashboards": {"enabled": False}, "store": store,
            "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5}, "eval": {"num_cpus": 0.5},
                          **over.pop("resources", {})}, **over}


def acts(store: Store, hp: str) -> tuple[np.ndarray, np.ndarray]:
    t = pads.dataset(store.path(f"acts/{hp}"), format="parquet").to_table().sort_by([("doc", "ascending"),
                                                                                      ("pos", "ascending")])
    return acts_to_numpy(t["act"]), np.stack([t["doc"].to_numpy(), t["pos"].to_numpy()], 1)


def test_two_checkpoints_audited_side_by_side(ray_local, tmp_path):
    from saeray.models.load import load_model

    spec = parse_spec(json.dumps(spec_dict(str(tmp_path / "store"), "two", ["step16", "main"])))
    summary = run_audit(spec)
    rc = open_run(spec)
    assert [t.id for t in rc.targets] == [f"{MODEL}@step16", f"{MODEL}@main"]
    assert {(r["revision"], r["hookpoint"]) for r in summary["saes"]} == \
        {(rev, f"resid_post.{i}") for rev in ("step16", "main") for i in range(2)}
    assert all(r["ce_loss_recovered"] is not None for r in summary["saes"])
    html = (tmp_path / "store" / "two" / "report" / "index.html").read_text()
    concepts = (tmp_path / "store" / "two" / "report" / "concepts.html").read_text()
    assert "step16" in html and f"{MODEL}@main · resid_post.1" in concepts and f"{MODEL}@step16" in concepts
    got = {}
    for t in rc.targets:
        st = rc.target(t).store
        assert st.exists("eval.json") and st.exists("saes/resid_post.1/topk-w64-k4/sae_weights.safetensors")
        model, tok = load_model(t.ref.path)
        c = Corpus(spec.corpus, tok).contexts(0, spec.corpus.n_docs)
        outs = {}   # each block's output, read with plain torch hooks (HF's last hidden state is after the final norm)
        for L, block in enumerate(model.gpt_neox.layers):
            block.register_forward_hook(lambda m, i, o, L=L: outs.__setitem__(L, o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(torch.as_tensor(c.ids))
        for L in range(2):
            a, docpos = acts(st, f"resid_post.{L}")
            want = outs[L][torch.as_tensor(c.keep)].numpy()
            # float32 harvest vs the full model's forward: same kernels up to fused-op rounding
            np.testing.assert_allclose(a, want, atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(docpos, np.argwhere(c.keep))
            got[(t.revision, L)] = a
    for L in range(2):   # two checkpoints, two different sets of activations
        assert np.abs(got[("step16", L)] - got[("main", L)]).mean() > 1e-2


def test_harvest_one_revision_then_audit_another_never_mixes(ray_local, tmp_path):
    d = spec_dict(str(tmp_path / "store"), "trap", ["main"], corpus={"n_docs": 32})
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(d))
    address = ray_local.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-m", "saeray", "--address", address, "harvest", str(path),
                        "--revision", "step16", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(out["targets"]) == [f"{MODEL}@step16"]
    run = Store.open(str(tmp_path / "store")) / "trap"
    step16 = run / f"targets/{MODEL}@step16"
    before = {p: step16.fs.info(p)["mtime"] for p in step16.fs.find(step16.path("acts"))}
    summary = run_audit(parse_spec(json.dumps(d)))
    # the audit harvested main itself, trained and evaluated only main, and reported main
    main = run / f"targets/{MODEL}@main"
    assert len(Records(main, "harvest").load()) == 2
    assert {r["revision"] for r in summary["saes"]} == {"main"} and all(f"@main/" in r["path"] for r in summary["saes"])
    assert not step16.exists("saes") and not step16.exists("eval.json")
    assert {p: step16.fs.info(p)["mtime"] for p in step16.fs.find(step16.path("acts"))} == before
    a16, _ = acts(step16, "resid_post.1")
    am, _ = acts(main, "resid_post.1")
    assert a16.shape == am.shape and not np.allclose(a16, am)
    m = run.read_json("manifest.json")["targets"]
    assert m[f"{MODEL}@main"]["stages"]["harvest"]["key"]["revision"] == "main"
    assert m[f"{MODEL}@step16"]["stages"]["harvest"]["key"]["revision"] == "step16"


def test_driver_killed_in_second_target_resumes_exactly(ray_local, tmp_path):
    """1.5 CPUs per shard actor on the session's 2-CPU Ray: one target's pool at a time, so one
    target finishes its harvest before the other starts."""
    d = spec_dict(str(tmp_path / "store"), "kill2", ["step8", "main"], corpus={"n_docs": 160},
                  harvest={"batch_size": 4, "unit_contexts": 8, "max_in_flight": 1},
                  resources={"harvest": {"num_cpus": 1.5}})
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(d))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "saeray", "--address", address, "harvest", str(path)]
    run = Store.open(str(tmp_path / "store")) / "kill2"
    recs = {rev: Records(run / f"targets/{MODEL}@{rev}", "harvest") for rev in ("step8", "main")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = second = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = {rev: r.store.exists("_records/harvest.json") for rev, r in recs.items()}
        if any(done.values()):
            first = next(rev for rev, ok in done.items() if ok)
            second = next(rev for rev in recs if rev != first)
            if len(recs[second].names()) >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_second = len(recs[second].names())
    assert 2 <= n_second < 20, "the driver must die in the second target's harvest for this test to mean anything"
    first_store = recs[first].store
    before = {p: first_store.fs.info(p)["mtime"] for p in first_store.fs.find(first_store.path())}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # nothing of the first target was redone: every file it had is untouched, and it has no new ones
    assert {p: first_store.fs.info(p)["mtime"] for p in first_store.fs.find(first_store.path())} == before
    spec = parse_spec(path.read_text())
    from saeray.models.load import load_tokenizer

    want = Corpus(spec.corpus, load_tokenizer(open_run(spec).targets[0].ref.path)).contexts(0, 160).rows()
    for rev, rec in recs.items():
        loaded = rec.load()
        assert len(loaded) == 20 and sum(u["rows"] for u in loaded.values()) == want
        t = pads.dataset(rec.store.path("acts/resid_post.1"), format="parquet").to_table()
        assert t.num_rows == want and len(set(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))) == want
        assert not [p for p in rec.store.fs.find(rec.store.path()) if ".tmp-" in p]

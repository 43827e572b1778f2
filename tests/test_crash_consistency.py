"""Crash consistency: a process SIGKILLed while it writes a harvest unit record, an SAE training
checkpoint or a sweep result leaves the run resumable, and the half-written object is never read.

Each audit runs as a real ``saeray`` CLI process with its own local Ray (so the crash variables of
:mod:`saeray.faults` reach the Ray workers too): a run that crashes at each of the three writes,
re-run without crashes, must equal an uninterrupted reference run of the same spec: the same
activations row for row, bit-identical SAE weights, the same sweep tables. Plus the trainer refusing
a checkpoint it could only load by unpickling arbitrary objects."""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import VENV_BIN
from saeray.run.records import Records
from saeray.store import Store

TARGET = "targets/neox@main"
LEASE_S = 3


def cli(args: list[str], tmp: Path, tag: str, env_extra: dict | None = None, timeout: float = 900) -> tuple[int, str]:
    """``saeray *args`` in its own process group, output to files (a SIGKILLed driver's Ray children
    may outlive it holding pipes); the group is killed afterwards so nothing of it stays behind."""
    env = {**os.environ, "SAERAY_OBJECT_STORE_BYTES": str(256 << 20), **(env_extra or {})}
    for k in ("SAERAY_CRASH_WRITE", "SAERAY_CRASH_SKIP", "SAERAY_CRASH_ONCE"):
        if k not in (env_extra or {}):
            env.pop(k, None)
    env.pop("RAY_ADDRESS", None)
    log = tmp / f"{tag}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "saeray"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, log.read_text(errors="replace")


def hidden(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


def visible_files(root: Path) -> set[str]:
    """Files a reader sees: no hidden temporaries, no lease, no Ray Train bookkeeping."""
    out = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")) \
                and "/_ray_train/" not in f"/{rel}" and not rel.startswith("_lease"):
            out.add(rel)
    return out


def sweep_tables(target: Path) -> dict:
    out = {}
    for t in ("prompts", "latents", "masking", "steering"):
        tab = ds.dataset(str(target / "sweeps/g" / t), format="parquet").to_table()
        tab = tab.drop_columns([c for c in tab.column_names if c.startswith("t_")])   # wall times
        out[t] = sorted(json.dumps(r, sort_keys=True) for r in tab.to_pylist())
    return out


def sae_tensors(target: Path) -> dict:
    from safetensors.torch import load_file

    return {p.relative_to(target).as_posix(): load_file(str(p))
            for p in sorted(target.glob("saes/*/*/sae_weights.safetensors"))}


def assert_same_results(ref: Path, run: Path) -> None:
    """Exactly the reference's results: every row, every weight, every sweep row."""
    import torch

    assert Records(Store.open(str(ref)), "harvest").load() == Records(Store.open(str(run)), "harvest").load()
    acts = sorted(p.relative_to(ref).as_posix() for p in ref.glob("acts/*/*.parquet"))
    assert acts and acts == sorted(p.relative_to(run).as_posix() for p in run.glob("acts/*/*.parquet"))
    for rel in acts:
        assert pq.read_table(ref / rel).equals(pq.read_table(run / rel)), rel
    a, b = sae_tensors(ref), sae_tensors(run)
    assert len(a) == 4 and a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for t in a[name]:
            assert torch.equal(a[name][t], b[name][t]), (name, t)
    assert sweep_tables(ref) == sweep_tables(run)


def write_spec(tmp: Path, model: str, store: dict, name: str) -> Path:
    from test_sweeps_ray import _prompts, spec_dict

    prompts = tmp / "q.jsonl"
    if not prompts.exists():
        _prompts(model, prompts, n=6)
    d = spec_dict(model, "unused", str(prompts), name=name, n_prompts=6, prompts_per_item=2)
    d["harvest"]["unit_contexts"] = 16          # four units: one recorded before the crash, three after
    d["sae"]["train"]["checkpoint_every"] = 10  # 30 steps: checkpoints at 10, 20, 30 (and the final one)
    d["sae"]["train"]["launcher"] = "ray_train"  # the default: a killed worker restarted by Ray Train
    d["store"] = store
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.slow
def test_kills_mid_write_resume_to_the_uninterrupted_result(tiny_model, tmp_path):
    store = {"url": str(tmp_path / "store"), "lease_seconds": LEASE_S}
    spec = write_spec(tmp_path, tiny_model, store, "crash")
    rc, log = cli(["audit", str(spec), "--run-name", "ref"], tmp_path, "ref")
    assert rc == 0, log[-3000:]
    ref, run = tmp_path / "store/ref" / TARGET, tmp_path / "store/crash" / TARGET
    assert not hidden(tmp_path / "store/ref")

    # (1) the driver dies while committing the second harvest unit's record
    once = tmp_path / "once-harvest"
    rc, log = cli(["harvest", str(spec)], tmp_path, "crash-harvest",
                  {"SAERAY_CRASH_WRITE": "_records/harvest/*", "SAERAY_CRASH_SKIP": "1", "SAERAY_CRASH_ONCE": str(once)})
    assert rc == -signal.SIGKILL and once.exists(), log[-3000:]
    assert len(Records(Store.open(str(run)), "harvest").names()) == 1
    (half,) = hidden(run / "_records/harvest")
    with pytest.raises(json.JSONDecodeError):
        json.loads(half.read_bytes())           # it is half-written, and no reader ever sees it
    time.sleep(LEASE_S + 1)                     # the killed driver's lease expires

    # (2) a training worker dies while writing its second checkpoint (Ray Train restarts it from the
    # first), then the driver dies while writing the second sweep item's masking table
    once = tmp_path / "once-train"
    rc, log = cli(["sweep", str(spec)], tmp_path, "crash-train-sweep",
                  {"SAERAY_CRASH_WRITE": "checkpoint.pt;sweeps/g/masking/*", "SAERAY_CRASH_SKIP": "1",
                   "SAERAY_CRASH_ONCE": str(once)})
    assert rc == -signal.SIGKILL, log[-3000:]
    assert once.exists() and Path(f"{once}.1").exists(), log[-3000:]   # both crashes happened
    (ckpt_half,) = [p for p in hidden(run / "saes") if p.name.endswith("-checkpoint.pt")]
    assert ckpt_half.stat().st_size > 0
    assert len(Records(Store.open(str(run / "sweeps/g")), "items").names()) == 1
    assert [p.parent.name for p in hidden(run / "sweeps/g")] == ["masking"]
    time.sleep(LEASE_S + 1)

    # (3) re-run without crashes: finishes, and equals the uninterrupted run exactly
    rc, log = cli(["audit", str(spec)], tmp_path, "resume")
    assert rc == 0, log[-3000:]
    assert "3 items (1 already done)" in log
    assert_same_results(ref, run)
    # the same files are visible (the crash left nothing a reader could pick up), and every one of
    # them is whole
    assert visible_files(run) == visible_files(ref)
    for rel in visible_files(run):
        if rel.endswith(".json"):
            json.loads((run / rel).read_bytes())


@pytest.mark.slow
def test_record_crash_on_s3_leaves_nothing_and_resumes_exactly(tiny_model, s3_url, tmp_path):
    """On S3 the half-written record is an upload never completed: no object at all."""
    spec_ref = write_spec(tmp_path, tiny_model, {"url": s3_url, "lease_seconds": LEASE_S}, "ref")
    spec = write_spec(tmp_path, tiny_model, {"url": s3_url, "lease_seconds": LEASE_S}, "crash")
    rc, log = cli(["harvest", str(spec_ref)], tmp_path, "ref")
    assert rc == 0, log[-3000:]
    once = tmp_path / "once"
    rc, log = cli(["harvest", str(spec)], tmp_path, "crash",
                  {"SAERAY_CRASH_WRITE": "_records/harvest/*", "SAERAY_CRASH_SKIP": "1", "SAERAY_CRASH_ONCE": str(once)})
    assert rc == -signal.SIGKILL and once.exists(), log[-3000:]
    run = Store.open(s3_url) / "crash" / "targets" / "neox@main"
    listed = run.fs.ls(run.path("_records/harvest"), detail=False)
    assert len(listed) == 1 and not any(".tmp-" in p for p in listed)
    time.sleep(LEASE_S + 1)
    rc, log = cli(["harvest", str(spec)], tmp_path, "resume")
    assert rc == 0 and "3 of 4 units to do" in log, log[-3000:]
    ref = Store.open(s3_url) / "ref" / "targets" / "neox@main"
    assert Records(ref, "harvest").load() == Records(run, "harvest").load()
    for hp in ("resid_post.1", "resid_post.2"):
        names = ref.ls(f"acts/{hp}")
        assert len(names) == 4 and run.ls(f"acts/{hp}") == names
        for n in names:
            a = pq.read_table(io.BytesIO(ref.read_bytes(f"acts/{hp}/{n}")))
            b = pq.read_table(io.BytesIO(run.read_bytes(f"acts/{hp}/{n}")))
            assert a.equals(b), (hp, n)


def test_checkpoint_that_needs_unpickling_is_refused_and_never_run(tmp_path):
    """A checkpoint is read with torch's weights-only loader: a crafted one (a shared bucket can hand
    us anything) is refused by name and its code never runs."""
    import torch

    from saeray.errors import InputError
    from saeray.sae.train import CKPT_NAME, MultiTrainer, TrainConfig, Variant

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    store = Store.open(str(tmp_path / "ckpt"))
    buf = io.BytesIO()
    torch.save({"version": 1, "evil": Evil()}, buf)
    store.write_bytes(CKPT_NAME, buf.getvalue())
    tr = MultiTrainer(8, [Variant("topk", 16, k=2)], TrainConfig(tokens=64, batch_size=32))
    with pytest.raises(InputError, match=r"checkpoint\.pt is not a checkpoint saeray can load safely.*Delete it"):
        tr.load_checkpoint(store)
    assert not marker.exists()
    # a plain pickle (not torch's format) is refused the same way
    store.write_bytes(CKPT_NAME, pickle.dumps(Evil()))
    with pytest.raises(InputError, match="can load safely"):
        tr.load_checkpoint(store)
    assert not marker.exists()

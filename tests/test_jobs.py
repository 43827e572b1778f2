"""The cluster path: a real Ray head started by `cluster/local.sh` on 127.0.0.1 (own ports, own temp
dir), a saeray job sent with `ray job submit --working-dir`, output checked in the store, and the
head stopped by its PID (only the processes this test started)."""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import VENV_BIN

pytestmark = pytest.mark.slow


def submit(address: str, env: dict, workdir: Path, *args: str, timeout: float = 420) -> str:
    """`ray job submit --no-wait`, then poll `ray job status` (bounded) until SUCCEEDED; returns the logs."""
    ray = str(VENV_BIN / "ray")
    for _ in range(30):  # bounded: a fresh head's job agent registers a few seconds after the API is up
        r = subprocess.run([ray, "job", "submit", "--no-wait", "--address", address, "--working-dir", str(workdir),
                            "--", *args], env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    job_id = re.search(r"raysubmit_\w+", r.stdout + r.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while time.monotonic() < deadline and not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"
    return logs


def write_spec(workdir: Path, model: str, store: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.yaml").write_text(textwrap.dedent(f"""\
        name: jobrun
        model: {{name: {model}}}
        corpus: {{n_docs: 64, context_len: 32, heldout_docs: 16}}
        hookpoints: ["resid_post.1"]
        harvest: {{batch_size: 16, unit_contexts: 32}}
        sae:
          architectures: [{{arch: topk, width: 64, k: 4}}]
          train: {{tokens: 4000, batch_size: 256}}
        store: {store}
        resources: {{harvest: {{num_cpus: 0.5}}, train: {{num_cpus: 0.5}}, eval: {{num_cpus: 0.5}}}}
        """))


def test_job_submit_audit_to_local_and_s3(ray_head, tiny_model, tmp_path, s3_url):
    address, env, _ = ray_head
    # local store: the job's relative paths resolve in its working dir, so give an absolute one
    store = tmp_path / "store"
    write_spec(tmp_path / "job", tiny_model, str(store))
    t0 = time.monotonic()
    out = submit(address, env, tmp_path / "job", "saeray", "audit", "spec.yaml")
    assert "report:" in out
    summary = json.loads((store / "jobrun" / "report" / "summary.json").read_text())
    manifest = json.loads((store / "jobrun" / "manifest.json").read_text())
    assert manifest["targets"]["neox@main"]["stages"]["harvest"]["status"] == "done"
    assert summary["run"] == "jobrun" and set(summary["stage_wall_s"]) == {"neox@main", "report"}
    assert set(summary["stage_wall_s"]["neox@main"]) == {"harvest", "train", "evaluate", "presence", "sweeps",
                                                          "dashboards"}
    assert [r["arch"] for r in summary["saes"]] == ["topk"] and summary["saes"][0]["ce_loss_recovered"] is not None
    assert (store / "jobrun" / "targets" / "neox@main" / "acts" / "resid_post.1" / "part-00000.parquet").is_file()
    # the same job against S3 (moto on loopback): the head inherited the endpoint from its env
    write_spec(tmp_path / "job-s3", tiny_model, s3_url)
    submit(address, env, tmp_path / "job-s3", "saeray", "audit", "spec.yaml")
    from saeray.store import Store

    run = Store.open(s3_url) / "jobrun"
    assert run.read_json("manifest.json")["targets"]["neox@main"]["stages"]["harvest"]["status"] == "done"
    assert len(run.read_json("report/summary.json")["saes"]) == 1
    assert run.exists("targets/neox@main/saes/resid_post.1/topk-w64-k4/sae_weights.safetensors")
    assert run.exists("report/index.html")
    print(f"two job submissions: {time.monotonic() - t0:.1f} s")

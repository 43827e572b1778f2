"""Shared fixtures: a real S3 endpoint (moto's server mode on 127.0.0.1) and a real local Ray.

The S3 environment is exported before Ray starts so that every Ray process inherits it
(feasibility §4: setting it after ray.init is too late for Ray Train's controller).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from saeray.bench.s3local import free_port  # noqa: F401 - tests import it from here

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def moto_endpoint():
    """`moto_server -H 127.0.0.1 -p PORT` as a subprocess, AWS_* exported; stopped by PID at the end."""
    from saeray.bench.s3local import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture
def s3_url(moto_endpoint):
    """A fresh bucket on the moto server; returns s3://bucket/prefix."""
    import boto3

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


@pytest.fixture(scope="session")
def ray_local(moto_endpoint, tmp_path_factory):
    """One real local Ray for the session, on 127.0.0.1, with a small object store."""
    from saeray.raycluster import local_env

    local_env()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
             log_to_driver=False, _temp_dir=None)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def store_url(request, tmp_path):
    """Parametrise a test over a local folder and S3 (moto): use `indirect` or call directly."""
    kind = getattr(request, "param", "local")
    if kind == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-init 4-layer GPT-NeoX with the storyworld tokenizer (no zoo build needed)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from saeray.storyworld.tokenizer import save_tokenizer, vocab_size

    path = tmp_path_factory.mktemp("model") / "neox"
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab_size(), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    save_tokenizer(path)
    return str(path)


def child_pids(marker: str) -> list[int]:
    """PIDs of this test session's own descendant processes whose command line contains
    ``marker`` (Ray names worker processes after their actor class, e.g. "ShardWorker")."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(marker in part for part in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def run_and_kill_child(fn, marker: str, ready, which: int = 0, timeout: float = 120,
                       join_timeout: float = 300) -> tuple[int | None, dict]:
    """Run ``fn()`` in a thread; once ``ready()`` is true and a new descendant process named
    ``marker`` exists, SIGKILL one of them (``which`` indexes the new ones, oldest first). Returns
    (the killed PID or None, {"out": fn's result} or {"err": its exception})."""
    import signal
    import threading
    import time

    result: dict = {}

    def target():
        try:
            result["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["err"] = e

    before = set(child_pids(marker))
    th = threading.Thread(target=target)
    th.start()
    killed = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and th.is_alive():
        pids = [p for p in child_pids(marker) if p not in before]
        if pids and ready():
            killed = pids[which]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    th.join(join_timeout)
    return killed, result


def has(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(could not read {path}: {e})"


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    """`transformers serve <SmolLM2-135M-Instruct folder> --host 127.0.0.1 --port PORT` as a subprocess
    of this venv, offline; yields (base_url, model_id) once `GET /v1/models` lists the model (the
    positional model is preloaded before the port opens, so listed means ready). The model id is
    the folder path exactly as given: a server pinned to a model answers 400 to any other id.
    Stopped by its PID (SIGTERM, bounded wait, SIGKILL)."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from saeray.models.smollm2 import materialize

    folder = str(materialize(progress=False))
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install transformers[serving]", pytrace=False)
    port = free_port()
    logdir = tmp_path_factory.mktemp("llm_server")
    out_log, err_log = logdir / "stdout.log", logdir / "stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [str(exe), "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        timeout = 180.0
        deadline = time.monotonic() + timeout
        model_id = None
        while model_id is None:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with code {proc.returncode} before serving; "
                            f"stderr tail:\n{_tail(err_log)}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(cmd)}` did not answer GET {base_url}/models within {timeout:.0f}s; "
                            f"stderr tail:\n{_tail(err_log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    ids = [m["id"] for m in json.load(r).get("data", [])]
                if folder in ids:
                    model_id = folder
            except (OSError, ValueError, KeyError):
                pass
            if model_id is None:
                time.sleep(0.5)
        yield base_url, model_id
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        import psutil

        assert proc.poll() is not None and not psutil.pid_exists(proc.pid), \
            f"transformers serve (PID {proc.pid}) is still running"

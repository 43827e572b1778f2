"""Shared fixtures: a real S3 endpoint (moto's server mode on 127.0.0.1) and a real local Ray.

The S3 environment is exported before Ray starts so that every Ray process inherits it
(feasibility §4: setting it after ray.init is too late for Ray Train's controller).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from saeray.bench.s3local import free_port  # noqa: F401 - tests import it from here

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, empty, 0, false and no are off (so CI=false is off)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config, items):
    """Slow end-to-end tests (``@pytest.mark.slow``: Ray jobs, kills and resumes, outages, the
    browser) run in CI (``CI=true``, what ``.ci/run`` gets) or with ``SAERAY_SLOW=1``; a plain local
    ``pytest`` skips them, so the everyday suite takes about 5 minutes on a 2-core machine instead
    of about 35. An explicit ``-m`` expression decides for itself."""
    if env_flag("CI") or env_flag("SAERAY_SLOW") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: runs in CI (CI=true) or with SAERAY_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
    import psutil

    # Ray's processes are this session's children; a Ray Train controller has outlived ray.shutdown()
    # here as an orphan (400 MB, for good), so whatever of ours is still up after a grace is killed
    ours = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        # Ray's own binaries and workers only (a checkout path may well contain "ray"); moto and the LLM
        # server are stopped by their own fixtures
        if cmd.startswith("ray::") or f"site-packages{os.sep}ray{os.sep}" in cmd:
            ours.append(p)
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


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


def kill_cli_midway(args: list[str], done, at_least: int, timeout: float = 240) -> tuple[bool, int]:
    """Run ``python -m saeray *args`` in its own process group, SIGKILL the group once ``done()``
    reaches ``at_least``; (was it still running when killed, ``done()`` at the kill)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "saeray", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and done() < at_least:
        time.sleep(0.02)
    n = done()
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive, n


def has(cmd: str) -> bool:
    return shutil.which(cmd) is not None


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    """`transformers serve <SmolLM2-135M-Instruct folder>` on loopback, offline
    (:func:`saeray.interp.serve.serving`); yields (base_url, model_id) once the model is listed,
    and checks after that the server process is gone."""
    import psutil

    from saeray.errors import SaerayError
    from saeray.interp import serve
    from saeray.models.smollm2 import materialize

    folder = str(materialize(progress=False))
    try:
        with serve.serving(folder, logdir=str(tmp_path_factory.mktemp("llm_server"))) as served:
            yield served.base_url, served.model_id
    except SaerayError as e:
        pytest.fail(str(e), pytrace=False)
    proc = served.proc
    assert proc.poll() is not None and not psutil.pid_exists(proc.pid), \
        f"transformers serve (PID {proc.pid}) is still running"


@pytest.fixture
def ray_head(tmp_path, moto_endpoint):
    """A Ray head with the S3 endpoint in its environment (jobs inherit it)."""
    env = {**os.environ, "SAERAY_RAY_DIR": str(tmp_path / "head"), "RAY_PORT": str(free_port()),
           "RAY_DASHBOARD_PORT": str(free_port()),
           # the session's other local Ray already holds the default agent port
           "RAY_AGENT_PORT": str(free_port()), "RAY_CLIENT_PORT": str(free_port()), "RAY_NUM_CPUS": "2", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(REPO / "cluster/local.sh"), "start"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = int((tmp_path / "head" / "head.pid").read_text())
    try:
        yield f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}", env, pid
    finally:
        r = subprocess.run(["bash", str(REPO / "cluster/local.sh"), "stop"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class WebhookReceiver:
    """A webhook receiver: an HTTP server on 127.0.0.1 answering each POST with the next status of ``codes`` (then 200)."""

    def __init__(self, codes=()):
        import http.server
        import threading

        self.codes, self.posts = list(codes), []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((self.path, json.loads(body)))
                self.send_response(outer.codes.pop(0) if outer.codes else 200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0K3N-secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_proxy(moto_endpoint):
    """A fault-injecting proxy (tests/s3proxy.py) in front of the session's moto server: down(),
    up(), errors(n, status, code). Closed at the end."""
    from s3proxy import S3Proxy

    px = S3Proxy(moto_endpoint)
    try:
        yield px
    finally:
        px.close()


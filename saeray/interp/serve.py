"""``transformers serve`` of a local model folder on loopback, for as long as a ``with`` block runs:
how a job uses a model of its own (SmolLM2 explaining its own heads) as an OpenAI-compatible
endpoint with nothing started by hand. Offline (no hub), bound to 127.0.0.1 on a free port,
stopped by its PID (SIGTERM, a bounded wait, SIGKILL), never by name.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..bench.s3local import free_port
from ..errors import SaerayError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(could not read {path}: {e})"


def _listed(base_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
            return [m["id"] for m in json.load(r).get("data", [])]
    except (OSError, ValueError, KeyError):
        return []


@dataclass(frozen=True)
class Served:
    base_url: str
    model_id: str
    proc: subprocess.Popen


@contextlib.contextmanager
def serving(folder: str, timeout_s: float = 180.0, logdir: str | None = None):
    """Yields a :class:`Served` once ``GET /v1/models`` lists the model (the positional model
    is loaded before the port opens, so listed means ready). The model id is the folder path as
    given: a server pinned to one model answers 400 to any other id."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        raise SaerayError(f"{exe} not found: install transformers[serving] (infra/bootstrap.sh does)")
    port = free_port()
    logs = Path(logdir or tempfile.mkdtemp(prefix="saeray-serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / "stdout.log", logs / "stderr.log"
    cmd = [str(exe), "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while folder not in _listed(base_url):
            if proc.poll() is not None:
                raise SaerayError(f"`{' '.join(cmd)}` exited with code {proc.returncode} before serving; "
                                  f"stderr tail:\n{_tail(err_log)}")
            if time.monotonic() > deadline:
                raise SaerayError(f"`{' '.join(cmd)}` did not answer GET {base_url}/models within {timeout_s:.0f}s; "
                                  f"stderr tail:\n{_tail(err_log)}")
            time.sleep(0.5)
        yield Served(base_url, folder, proc)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)

"""A real S3 endpoint on loopback for benchmarks and tests: moto's server mode as a subprocess of
this venv (not moto's in-process mock), stopped by its PID. The AWS environment is exported for
this process and for every Ray process started after it (Ray workers inherit the environment they
start with; setting it later does not reach them)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a subprocess from this venv), with the AWS environment
    exported for this process and for every Ray process started after it. Stopped by PID."""
    from ..errors import SaerayError

    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise SaerayError(f"{exe} not found: install moto[server] (the test extra) or pass --no-s3")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SaerayError(f"moto_server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

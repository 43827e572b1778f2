"""Crash injection for the crash-consistency tests: a process that dies while writing an object.

``SAERAY_CRASH_WRITE=<glob>`` (fnmatch on the path relative to the store folder the write goes
through, e.g. ``*_records/harvest/*`` or ``*sae/*/checkpoint*``) makes the first matching write in
each process kill that process with SIGKILL after the data went out but before the object is
committed: a local temporary is left half-written (truncated to half its bytes), an S3 upload is
never completed. Unset (always, outside tests) this costs one environment look-up per write.
``SAERAY_CRASH_ONCE=<file>``: only the first process to create that file crashes, so a Ray worker
restarted with the same environment does not crash again.
"""
from __future__ import annotations

import fnmatch
import os
import signal


def crash_point(rel: str, f, tmp: str | None) -> None:
    pattern = os.environ.get("SAERAY_CRASH_WRITE")
    if not pattern or not fnmatch.fnmatch(rel.strip("/"), pattern):
        return
    once = os.environ.get("SAERAY_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    f.flush()
    if tmp is not None:
        os.truncate(tmp.removeprefix("file://"), max(0, os.path.getsize(tmp.removeprefix("file://")) // 2))
    os.kill(os.getpid(), signal.SIGKILL)

"""Crash injection for the crash-consistency tests: a process that dies while writing an object.

``SAERAY_CRASH_WRITE=<glob>[;<glob>...]`` (fnmatch on the path relative to the store folder the
write goes through, e.g. ``*_records/harvest/*`` or ``checkpoint.pt``) makes a matching write kill
its process with SIGKILL after the data went out but before the object is committed: a local
temporary is left half-written (truncated to half its bytes), an S3 upload is never completed.
Unset (always, outside tests) this costs one environment look-up per write.

``SAERAY_CRASH_SKIP=<n>``: let the first ``n`` writes matching each glob in each process through,
so that the crash comes after some of that kind of object exist (a later checkpoint over an
earlier one, the second unit record). ``SAERAY_CRASH_ONCE=<file>``: only the first process to
create that file crashes (``<file>.<i>`` for the i-th glob, i > 0), so a Ray worker restarted with
the same environment does not crash again. Several globs let one run crash once in the driver and
once in a worker (each glob crashes once under ``SAERAY_CRASH_ONCE``).
"""
from __future__ import annotations

import fnmatch
import os
import signal

_matched: dict[str, int] = {}  # glob -> matching writes seen in this process


def crash_point(rel: str, f, tmp: str | None) -> None:
    spec = os.environ.get("SAERAY_CRASH_WRITE")
    if not spec:
        return
    rel = rel.strip("/")
    hit = next(((i, g) for i, g in enumerate(spec.split(";")) if g and fnmatch.fnmatch(rel, g)), None)
    if hit is None:
        return
    i, glob = hit
    _matched[glob] = n = _matched.get(glob, 0) + 1
    if n <= int(os.environ.get("SAERAY_CRASH_SKIP", "0")):
        return
    once = os.environ.get("SAERAY_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once if i == 0 else f"{once}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    f.flush()
    if tmp is not None:
        path = tmp.removeprefix("file://")
        os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

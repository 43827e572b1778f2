"""Progress for long work: a rich bar on a terminal, plain periodic log lines otherwise.

Usage::

    with progress("harvest", total=n_tokens, unit="tok") as p:
        for batch in ...:
            p.advance(len(batch), loss=0.12)   # extra fields are shown next to the bar / in the log line
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("saeray")


def _is_tty() -> bool:
    return sys.stderr.isatty()


class _Progress:
    def __init__(self, desc: str, total: float | None, unit: str, every_s: float):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.done = 0.0
        self.fields: dict[str, object] = {}
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._rich = None
        self._task = None

    def _fmt_fields(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        return " ".join(parts)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        if self._rich is not None:
            self._rich.update(self._task, advance=n, fields=self._fmt_fields())
            return
        now = time.perf_counter()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            self._log_line()

    def _log_line(self) -> None:
        rate = self.rate()
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            msg = f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} ({pct:.1f}%), {rate:.3g} {self.unit}/s, ETA {eta:.0f}s"
        else:
            msg = f"{self.desc}: {self.done:.0f} {self.unit}, {rate:.3g} {self.unit}/s"
        extra = self._fmt_fields()
        log.info(msg + (f" {extra}" if extra else ""))


_shared: dict = {"rich": None, "users": 0}
_shared_lock = threading.Lock()


def _rich_progress(unit: str):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task):  # rich's speed is None until it has two samples
            u = task.fields.get("unit", unit)
            return Text(f"{task.speed:,.0f} {u}/s" if task.speed else f"- {u}/s")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Speed(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"),
    )


@contextmanager
def progress(desc: str, total: float | None = None, unit: str = "it", every_s: float = 10.0) -> Iterator[_Progress]:
    """Several bars may be open at once (targets run side by side): on a terminal they share one
    live display, one row each."""
    p = _Progress(desc, total, unit, every_s)
    if _is_tty():
        with _shared_lock:
            if _shared["rich"] is None:
                _shared["rich"] = _rich_progress(unit)
                _shared["rich"].start()
            _shared["users"] += 1
            rp = _shared["rich"]
        p._rich = rp
        p._task = rp.add_task(desc, total=total, fields="", unit=unit)
        try:
            yield p
        finally:
            with _shared_lock:
                _shared["users"] -= 1
                if _shared["users"] == 0:
                    rp.stop()
                    _shared["rich"] = None
                else:
                    rp.remove_task(p._task)
    else:
        log.info(f"{desc}: started" + (f" ({total:.0f} {unit})" if total else ""))
        try:
            yield p
        finally:
            p._log_line()

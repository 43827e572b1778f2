"""The harvest job: what a model-pool worker does with its layers' activations during a harvest.
Each item is one work unit; every batch's kept rows of this stage's hook points go to that unit's
Parquet files (:class:`~saeray.harvest.writer.UnitWriter`), and ``finish`` closes them and returns
their records. A plain object (see :mod:`saeray.models.pool`).

Writing runs in a background thread when a core is free for it, so the next batch's forward
overlaps the Parquet encoding and upload of the previous one (pyarrow and torch both release the
GIL).
"""
from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch

from ..store import Store
from .writer import UnitWriter


class HarvestJob:
    logits = False
    grad = False

    def __init__(self, stage, device: torch.device, hookpoints: list[str], widths: dict[str, int], store: Store,
                 act_dtype: str, meta: dict[str, str]):
        self.device = device
        self.hookpoints = hookpoints
        self.writer = UnitWriter(store, {hp: widths[hp] for hp in hookpoints}, act_dtype, meta) if hookpoints else None
        self.act_dtype = torch.float16 if act_dtype == "float16" else torch.float32
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._err: BaseException | None = None
        self.overlap = _overlap_writes(device, torch.get_num_threads())
        if self.overlap:
            threading.Thread(target=self._write_loop, daemon=True).start()

    def _write_loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if self._err is None:
                    job()
            except BaseException as e:  # surfaced on the next call
                self._err = e
            finally:
                self._q.task_done()

    def _drain(self) -> None:
        self._q.join()
        if self._err is not None:
            err, self._err = self._err, None
            raise err

    def begin(self, item: str) -> None:
        self._q.join()
        self._err = None
        if self.writer is not None:
            self.writer.begin(item)

    def capture(self, payload: dict) -> list[str]:
        return self.hookpoints

    def interventions(self, payload: dict) -> None:
        return None

    def on_acts(self, payload: dict, acts: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        if self._err is not None:
            self._drain()
        keep = np.asarray(payload["keep"])
        keep_t = torch.from_numpy(np.array(keep)).to(self.device)
        rows_doc = np.repeat(payload["doc"], keep.sum(1))
        rows_pos = np.nonzero(keep)[1].astype(np.int32)
        rows_tok = np.asarray(payload["ids"])[keep].astype(np.int32)
        out = {hp: acts[hp][keep_t].to("cpu", self.act_dtype).numpy() for hp in self.hookpoints}
        writer = self.writer

        def write() -> None:
            for hp, a in out.items():
                writer.add(hp, rows_doc, rows_pos, rows_tok, a)

        if self.overlap:
            self._q.put(write)
        else:
            write()

    def on_output(self, payload: dict, output: torch.Tensor) -> None:
        return None

    def finish(self, item: str) -> dict[str, dict]:
        self._drain()
        return self.writer.finish() if self.writer is not None else {}


def _overlap_writes(device: torch.device, threads: int) -> bool:
    """Write in a background thread only when a core is left over for it: on a GPU the CPU is
    free while the device computes; on CPU a writer thread beside a torch pool that already holds
    every core preempts one of its threads, and the whole forward waits for it at the next
    barrier (measured: slower than writing inline on 2 cores)."""
    override = os.environ.get("SAERAY_HARVEST_WRITE_THREAD")
    if override in ("0", "1"):
        return override == "1"
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return threads < cores

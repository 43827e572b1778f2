"""A shard worker: one contiguous layer range of a frozen model plus the writer for the hook
points of those layers. A plain Python object (unit-testable without Ray); :data:`ShardActor` is
the Ray actor around it.

Protocol per work unit (the driver calls, in order, on every stage of one pipeline)::

    begin(unit, attempt)                   # start a fresh unit, dropping any half-written one
    forward(unit, attempt, x, doc, ids, keep) -> hidden   # once per batch; x = ids (first stage) or hidden
    finish(unit, attempt) -> {hookpoint: record}          # files become visible; records go to the manifest

A worker that was restarted by Ray after a crash has lost the rows it had buffered for the unit;
any later call for that (unit, attempt) raises :class:`UnitLost`, and the driver re-runs the unit
as a new attempt. Rows are therefore never silently missing from a unit.

Writing runs in a background thread so the next batch's forward overlaps the Parquet encoding and
upload of the previous one (pyarrow and torch both release the GIL).
"""
from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch

from ..store import Store
from .writer import UnitWriter


class UnitLost(RuntimeError):
    """The worker does not hold this unit (restarted, or never began it): re-run the unit."""


class ShardWorker:
    def __init__(self, model_path: str, revision: str | None, layer_range: tuple[int, int], hookpoints: list[str],
                 widths: dict[str, int], run: Store, act_dtype: str, meta: dict[str, str],
                 dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                 threads: int | None = None):
        from ..models.shard import Stage

        if threads:
            torch.set_num_threads(threads)
        self.stage = Stage.from_pretrained(model_path, tuple(layer_range), revision=revision, dtype=dtype,
                                           device=device, trust_remote_code=trust_remote_code)
        self.device = torch.device(device)
        self.hookpoints = hookpoints
        self.writer = UnitWriter(run, {hp: widths[hp] for hp in hookpoints}, act_dtype, meta) if hookpoints else None
        self.act_dtype = torch.float16 if act_dtype == "float16" else torch.float32
        self.current: tuple[str, int] | None = None
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._err: BaseException | None = None
        self.overlap = _overlap_writes(self.device, threads)
        if self.overlap:
            self._t = threading.Thread(target=self._write_loop, daemon=True)
            self._t.start()

    # -- background writer ------------------------------------------------------------------------
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

    # -- protocol ---------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def begin(self, unit: str, attempt: int) -> None:
        self._q.join()
        self._err = None
        if self.writer is not None:
            self.writer.begin(unit)
        self.current = (unit, attempt)

    def _check(self, unit: str, attempt: int) -> None:
        if self.current != (unit, attempt):
            raise UnitLost(f"worker holds {self.current}, not unit {unit} attempt {attempt}")

    @torch.inference_mode()
    def forward(self, unit: str, attempt: int, x, doc: np.ndarray, ids: np.ndarray, keep: np.ndarray):
        self._check(unit, attempt)
        if self._err is not None:
            self._drain()
        # arrays from the object store are read-only views: copy before torch owns them
        inputs = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x).to(self.device)
        out = self.stage(inputs, capture=self.hookpoints, logits=False)
        if self.writer is not None:
            keep_t = torch.from_numpy(np.array(keep)).to(self.device)
            rows_doc = np.repeat(doc, keep.sum(1))
            rows_pos = np.nonzero(keep)[1].astype(np.int32)
            rows_tok = ids[keep].astype(np.int32)
            acts = {hp: out.acts[hp][keep_t].to("cpu", self.act_dtype).numpy() for hp in self.hookpoints}
            writer = self.writer

            def write() -> None:
                for hp, a in acts.items():
                    writer.add(hp, rows_doc, rows_pos, rows_tok, a)

            if self.overlap:
                self._q.put(write)
            else:
                write()
        # what crosses to the next stage: CPU tensor (through the Ray object store)
        return None if self.stage.is_last else out.output.to("cpu")

    def finish(self, unit: str, attempt: int) -> dict[str, dict]:
        self._check(unit, attempt)
        self._drain()
        records = self.writer.finish() if self.writer is not None else {}
        self.current = None
        return records


def _overlap_writes(device: torch.device, threads: int | None) -> bool:
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
    return (threads or torch.get_num_threads()) < cores


def make_actor_class():
    """The Ray actor around ShardWorker. Restarted by Ray if its process dies; calls are not
    retried blindly (a restarted worker answers UnitLost and the driver re-runs the unit)."""
    import ray

    return ray.remote(max_restarts=3, max_task_retries=0)(ShardWorker)

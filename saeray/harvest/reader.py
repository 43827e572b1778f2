"""Streaming activation datasets for SAE training: Parquet files of one hook point, local or S3,
read file by file with a background prefetch, a shuffle buffer, and exact epoch accounting (each
row exactly once per epoch, order a pure function of (seed, epoch) so a resumed run sees the same
stream).

Two ways in: :meth:`ActivationDataset.from_target` lists only the units a target's harvest records
as done (a file written by a crashed unit never leaks in); :class:`ActivationDataset` on a URL takes
every ``*.parquet`` under it (any dataset with a fixed-size-list ``act`` column).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from ..errors import InputError
from ..store import Store
from .schema import acts_to_numpy, read_meta


@dataclass
class ActivationDataset:
    url: str
    files: list[str] = field(default_factory=list)     # relative to url; listed if empty
    batch_size: int = 4096
    shuffle_buffer: int = 1 << 16                        # rows; 0 = no shuffling (file order)
    seed: int = 0
    prefetch: int = 2                                    # files read ahead in a background thread
    store_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.store = Store(self.url, self.store_options) if "://" in self.url else Store.open(self.url)
        if not self.files:
            found = [p for p in self.store.fs.find(self.store.path()) if p.endswith(".parquet")]
            root = self.store.path().rstrip("/") + "/"
            self.files = sorted(p[len(root):] for p in found
                                if not p.rsplit("/", 1)[-1].startswith((".", "_")))
        if not self.files:
            raise InputError(f"{self.url}: no .parquet files found; pass a hook-point dataset "
                             "(e.g. <run>/acts/resid_post.0) or a folder of Parquet files with an 'act' column")
        first = self._schema(self.files[0])
        if "act" not in first.names:
            raise InputError(f"{self.url}/{self.files[0]}: no 'act' column (columns: {first.names})")
        act_t = first.field("act").type
        if not hasattr(act_t, "list_size"):
            raise InputError(f"{self.url}/{self.files[0]}: column 'act' must be a fixed_size_list of floats, got {act_t}")
        self.d = act_t.list_size
        self.meta = read_meta(first)
        self._rows: int | None = None

    @classmethod
    def from_target(cls, target: Store, hookpoint: str, **kw) -> "ActivationDataset":
        """The recorded units of ``hookpoint`` in a target's folder (``<run>/targets/<model>@<rev>``)."""
        from ..run.records import Records

        units = Records(target, "harvest").load()
        files = [u["files"][hookpoint]["path"] for _, u in sorted(units.items()) if hookpoint in u["files"]]
        if not files:
            raise InputError(f"{target.url}: no harvested units for hook point {hookpoint}; run the harvest first")
        prefix = "acts/" + hookpoint + "/"
        return cls(target.url_of("acts/" + hookpoint), files=[f[len(prefix):] if f.startswith(prefix) else f for f in files],
                   store_options=target.options, **kw)

    # -- metadata ---------------------------------------------------------------------------------
    def _schema(self, rel: str):
        with self.store.fs.open(self.store.path(rel), "rb") as f:
            return pq.ParquetFile(f).schema_arrow

    @property
    def num_rows(self) -> int:
        if self._rows is None:
            total = 0
            for rel in self.files:
                with self.store.fs.open(self.store.path(rel), "rb") as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            self._rows = total
        return self._rows

    # -- reading ----------------------------------------------------------------------------------
    def _read(self, rel: str) -> np.ndarray:
        with self.store.fs.open(self.store.path(rel), "rb") as f:
            t = pq.read_table(f, columns=["act"])
        return acts_to_numpy(t.column("act"))

    def _file_stream(self, order: list[str]) -> Iterator[np.ndarray]:
        if self.prefetch <= 0:
            for rel in order:
                yield self._read(rel)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker() -> None:
            try:
                for rel in order:
                    if stop.is_set():
                        return
                    q.put(self._read(rel))
                q.put(None)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)

    def epoch(self, epoch: int = 0, drop_last: bool = False) -> Iterator[np.ndarray]:
        """One pass: [batch, d] float arrays (storage dtype); every row exactly once."""
        rng = np.random.default_rng([self.seed, epoch])
        order = list(self.files)
        if self.shuffle_buffer:
            rng.shuffle(order)
        B = self.batch_size
        buf: list[np.ndarray] = []
        n_buf = 0
        for arr in self._file_stream(order):
            buf.append(arr)
            n_buf += len(arr)
            if n_buf >= max(self.shuffle_buffer, B) + B:
                pool = np.concatenate(buf)
                if self.shuffle_buffer:
                    pool = pool[rng.permutation(len(pool))]
                # emit down to half the buffer so later files mix with earlier ones
                keep = min(len(pool), self.shuffle_buffer // 2) if self.shuffle_buffer else 0
                n_emit = (len(pool) - keep) // B * B
                for i in range(0, n_emit, B):
                    yield pool[i : i + B]
                buf, n_buf = [pool[n_emit:]], len(pool) - n_emit
        if n_buf:
            pool = np.concatenate(buf)
            if self.shuffle_buffer:
                pool = pool[rng.permutation(len(pool))]
            for i in range(0, len(pool), B):
                if drop_last and i + B > len(pool):
                    break
                yield pool[i : i + B]

    def batches(self, tokens: int | None = None, epochs: int | None = None, start_epoch: int = 0) -> Iterator[np.ndarray]:
        """Batches across epochs until ``tokens`` rows or ``epochs`` passes (whichever comes first)."""
        if tokens is None and epochs is None:
            epochs = 1
        seen, e = 0, start_epoch
        while (epochs is None or e < start_epoch + epochs) and (tokens is None or seen < tokens):
            for b in self.epoch(e):
                if tokens is not None and seen + len(b) > tokens:
                    b = b[: tokens - seen]
                if len(b):
                    yield b
                seen += len(b)
                if tokens is not None and seen >= tokens:
                    return
            e += 1

    def to_ray(self):
        """The same files as a Ray Data dataset (columns doc, pos, token, act)."""
        import ray.data

        fs, root = self.store.arrow_fs()
        return ray.data.read_parquet([f"{root}/{rel}" for rel in self.files], filesystem=fs)

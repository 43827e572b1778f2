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
import pyarrow as pa
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
        listed = not self.files   # a URL from the user, not the files a harvest recorded
        if listed:
            if not self.store.fs.exists(self.store.path()):
                raise InputError(f"--activations {self.url}: no such folder; pass a hook-point dataset "
                                 "(e.g. <run>/targets/<model>@<rev>/acts/resid_post.0) or a folder of Parquet files")
            found = [p for p in self.store.fs.find(self.store.path()) if p.endswith(".parquet")]
            root = self.store.path().rstrip("/") + "/"
            self.files = sorted(p[len(root):] for p in found
                                if not p.rsplit("/", 1)[-1].startswith((".", "_")))
        if not self.files:
            raise InputError(f"{self.url}: no .parquet files found; pass a hook-point dataset "
                             "(e.g. <run>/acts/resid_post.0) or a folder of Parquet files with an 'act' column")
        self._rows: int | None = None
        first = self._schema(self.files[0])
        self.d = self._width(self.files[0], first)
        self.meta = read_meta(first)
        if listed:
            self._check_files()

    def _width(self, rel: str, schema) -> int:
        if "act" not in schema.names:
            raise InputError(f"{self.url}/{rel}: no 'act' column (columns: {schema.names}); pass a hook-point "
                             "dataset written by saeray harvest, or Parquet files with a fixed-size-list 'act' column")
        act_t = schema.field("act").type
        if not hasattr(act_t, "list_size") or not pa.types.is_floating(act_t.value_type):
            raise InputError(f"{self.url}/{rel}: column 'act' must be a fixed_size_list of floats, got {act_t}")
        return act_t.list_size

    def _check_files(self) -> None:
        """Every file's footer read once before training: a truncated or foreign file, or one of
        another width, fails now with its name instead of mid-run (footers only; no data read)."""
        total = 0
        for rel in self.files:
            schema, rows = self._footer(rel)
            d = self._width(rel, schema)
            if d != self.d:
                raise InputError(f"{self.url}/{rel}: activations of width {d}, but {self.files[0]} has {self.d}; a "
                                 "dataset holds one hook point: remove the file or pass its own folder")
            total += rows
        self._rows = total

    def _footer(self, rel: str):
        """(schema, rows) of one file, from its footer."""
        try:
            with self.store.fs.open(self.store.path(rel), "rb") as f:
                pf = pq.ParquetFile(f)
                return pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{self.url}/{rel}: not a readable Parquet file ({e}); the file is truncated or not "
                             "Parquet: remove it or harvest again") from None

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
        return self._footer(rel)[0]

    @property
    def num_rows(self) -> int:
        if self._rows is None:
            self._rows = sum(self._footer(rel)[1] for rel in self.files)
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

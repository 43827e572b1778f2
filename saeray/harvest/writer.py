"""Writes one work unit's activations, one Parquet file per hook point, streaming a row group per
batch so a unit never has to fit in memory. A plain Python object: the shard actor wraps it, tests
use it directly.

Encoding is :mod:`saeray.harvest.parquet_encode` (pyarrow's generic writer cost a quarter of a
small model's forward pass). Files appear atomically (hidden temporary, then move:
:meth:`saeray.store.Store.open_write`) and are reported with rows, bytes and sha256 for the
manifest; a unit that is abandoned midway (actor restart, new attempt) leaves nothing visible
behind.
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack

import numpy as np

from ..store import Store
from .parquet_encode import ActFileWriter
from .schema import schema


class _Hashing:
    """File wrapper that hashes and counts what the encoder writes through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        self.n += mv.nbytes
        self.f.write(b)
        return mv.nbytes


def part_path(hookpoint: str, unit: str) -> str:
    return f"acts/{hookpoint}/part-{unit}.parquet"


class UnitWriter:
    def __init__(self, run: Store, widths: dict[str, int], dtype: str, meta: dict[str, str]):
        self.run, self.widths, self.dtype, self.meta = run, widths, dtype, meta
        self.unit: str | None = None
        self._stack: ExitStack | None = None
        self._w: dict[str, tuple[ActFileWriter, _Hashing]] = {}
        self._rows: dict[str, int] = {}

    def begin(self, unit: str) -> None:
        self.abort()
        self.unit = unit
        self._stack = ExitStack()
        self._rows = {hp: 0 for hp in self.widths}

    def _writer(self, hp: str) -> tuple[ActFileWriter, _Hashing]:
        if hp not in self._w:
            assert self._stack is not None and self.unit is not None
            f = self._stack.enter_context(self.run.open_write(part_path(hp, self.unit)))
            hf = _Hashing(f)
            sch = schema(self.widths[hp], self.dtype, {**self.meta, "hookpoint": hp, "d": self.widths[hp],
                                                        "dtype": self.dtype, "unit": self.unit})
            self._w[hp] = (ActFileWriter(hf, sch), hf)
        return self._w[hp]

    def add(self, hp: str, doc: np.ndarray, pos: np.ndarray, token: np.ndarray, act: np.ndarray) -> None:
        w, _ = self._writer(hp)
        w.write(doc, pos, token, act)
        self._rows[hp] += len(doc)

    def finish(self) -> dict[str, dict]:
        """Close every file (they become visible now) and return their manifest records."""
        assert self._stack is not None and self.unit is not None, "finish() without begin()"
        for hp in self.widths:  # a unit with zero kept rows still gets (empty) files: counts stay exact
            self._writer(hp)
        records = {}
        for hp, (w, hf) in self._w.items():
            w.close()
            records[hp] = {"path": part_path(hp, self.unit), "rows": self._rows[hp], "bytes": hf.n,
                           "sha256": hf.h.hexdigest()}
        self._stack.close()  # promotes each temporary to its final name
        self._w, self._stack, self.unit = {}, None, None
        return records

    def abort(self) -> None:
        """Drop a half-written unit: temporaries are deleted, nothing becomes visible."""
        if self._stack is None:
            return
        stack, self._stack, self._w, self.unit = self._stack, None, {}, None
        try:
            stack.__exit__(RuntimeError, RuntimeError("unit aborted"), None)
        except RuntimeError:
            pass

"""The Parquet contract for harvested activations (documented in docs/store.md).

One dataset per hook point, ``<run>/acts/<hookpoint>/part-<unit>.parquet``, one row per kept token:

=======  ==============================================  ===========================================
column   type                                            meaning
=======  ==============================================  ===========================================
doc      int64                                           context index in the corpus order
pos      int32                                           position in the context (0 = BOS if any)
token    int32                                           token id at ``pos`` (the model's input)
act      fixed_size_list<float16 or float32>[d]          activation at the hook point
=======  ==============================================  ===========================================

File-level key-value metadata (strings): ``saeray.model``, ``saeray.revision``,
``saeray.hookpoint``, ``saeray.d``, ``saeray.dtype``, ``saeray.unit``. Plain Arrow types only, so
pyarrow, Ray Data, polars and duckdb read the files without saeray installed.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

META_PREFIX = "saeray."
ACT_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def schema(d: int, dtype: str, meta: dict[str, str] | None = None) -> pa.Schema:
    s = pa.schema([
        pa.field("doc", pa.int64(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("act", pa.list_(pa.field("item", ACT_DTYPES[dtype], nullable=False), d), nullable=False),
    ])
    if meta:
        s = s.with_metadata({f"{META_PREFIX}{k}": str(v) for k, v in meta.items()})
    return s


def read_meta(sch: pa.Schema) -> dict[str, str]:
    md = sch.metadata or {}
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in md.items() if k.decode().startswith(META_PREFIX)}


def acts_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column to a [n, d] numpy array without a per-row Python loop."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d)

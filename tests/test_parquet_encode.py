"""The hand-rolled Parquet encoder against pyarrow's own writer (the reference) and the readers the
store contract promises: same schema and metadata, same values, statistics usable for filtering."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from saeray.harvest import parquet_encode
from saeray.harvest.parquet_encode import ActFileWriter
from saeray.harvest.schema import schema


def _rows(seed: int, n: int, d: int, first_doc: int):
    rng = np.random.default_rng(seed)
    doc = first_doc + np.repeat(np.arange(n // 5 + 1), 5)[:n].astype(np.int64)
    pos = (np.arange(n) % 5 + 1).astype(np.int32)
    token = rng.integers(0, 1000, n).astype(np.int32)
    act = rng.standard_normal((n, d)).astype(np.float32) * 3
    return doc, pos, token, act


def _pyarrow_table(parts, sch: pa.Schema) -> pa.Table:
    """What pyarrow's ParquetWriter makes of the same rows, read back."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, sch) as w:
        for doc, pos, token, act in parts:
            d = act.shape[1]
            vtype = sch.field("act").type.value_type
            vals = pa.array(act.astype(np.float16 if vtype == pa.float16() else np.float32).reshape(-1), vtype)
            w.write_table(pa.Table.from_arrays([pa.array(doc), pa.array(pos), pa.array(token),
                                                pa.FixedSizeListArray.from_arrays(vals, d)], schema=sch))
    return pq.read_table(io.BytesIO(buf.getvalue()))


def _ours(parts, sch: pa.Schema) -> bytes:
    buf = io.BytesIO()
    w = ActFileWriter(buf, sch)
    for p in parts:
        w.write(*p)
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("d,n", [(1, 7), (32, 300), (3000, 400)])   # d=3000: several pages per row group
def test_same_table_as_pyarrow(dtype, d, n, monkeypatch):
    monkeypatch.setattr(parquet_encode, "PAGE_BYTES", 1 << 18)
    sch = schema(d, dtype, {"model": "m", "hookpoint": "resid_post.0", "d": d})
    parts = [_rows(0, n, d, 0), _rows(1, n // 2 + 1, d, 1000)]
    data = _ours(parts, sch)
    got = pq.read_table(io.BytesIO(data))
    want = _pyarrow_table(parts, sch)
    assert got.schema.equals(want.schema, check_metadata=True)
    assert got.equals(want)
    md = pq.read_metadata(io.BytesIO(data))
    assert md.num_row_groups == 2 and md.num_rows == n + n // 2 + 1


def test_readers_without_saeray(tmp_path):
    import duckdb
    import polars as pl

    d = 16
    sch = schema(d, "float16", {"model": "m"})
    parts = [_rows(0, 50, d, 0), _rows(1, 30, d, 100)]
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(_ours(parts, sch))
    want = np.concatenate([p[3] for p in parts]).astype(np.float16)

    df = pl.read_parquet(path)
    assert df.shape == (80, 4) and df["act"].dtype == pl.Array(pl.Float16, d)
    np.testing.assert_array_equal(np.asarray(df["act"].to_list(), dtype=np.float16), want)
    rows = duckdb.sql(f"select doc, pos, token, act from '{path}' order by doc, pos").fetchall()
    assert len(rows) == 80
    np.testing.assert_array_equal(np.asarray([r[3] for r in rows], dtype=np.float16),
                                  want[np.lexsort((np.concatenate([p[1] for p in parts]),
                                                   np.concatenate([p[0] for p in parts])))])
    # min/max statistics let a dataset scan skip the first row group entirely
    frag = next(pads.dataset(path, format="parquet").get_fragments())
    stats = [rg.statistics["doc"] for rg in frag.row_groups]
    assert stats == [{"min": 0, "max": int(parts[0][0].max())}, {"min": 100, "max": int(parts[1][0].max())}]
    assert len(frag.subset(pads.field("doc") >= 100).row_groups) == 1


def test_empty_file_reads_as_zero_rows(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(_ours([], schema(8, "float16", {"model": "m"})))
    t = pq.read_table(path)
    assert t.num_rows == 0 and t.schema.field("act").type.list_size == 8


def test_wrong_width_is_refused():
    w = ActFileWriter(io.BytesIO(), schema(8, "float16"))
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(3, 8\)"):
        w.write(np.arange(3), np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32), np.zeros((3, 4)))

"""The store on a local folder and on a real S3 endpoint (moto server on 127.0.0.1): same code."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from saeray.errors import InputError
from saeray.manifest import Manifest
from saeray.store import Store

both = pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)


@both
def test_roundtrip_and_listing(store_url):
    st = Store.open(store_url) / "run1"
    st.write_json("manifest.json", {"a": 1})
    st.write_bytes("acts/resid_post.0/part-00000.parquet", b"x" * 1000)
    assert st.read_json("manifest.json") == {"a": 1}
    assert st.ls("acts") == ["resid_post.0"]
    assert st.size("acts/resid_post.0/part-00000.parquet") == 1000
    assert st.exists("manifest.json") and not st.exists("nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        st.read_bytes("nope.json")


@both
def test_failed_write_leaves_nothing_and_keeps_old_data(store_url):
    st = Store.open(store_url)
    st.write_bytes("d/file.bin", b"old")
    with pytest.raises(RuntimeError):
        with st.open_write("d/file.bin") as f:
            f.write(b"new-partial" * 100_000)
            raise RuntimeError("crash mid-write")
    assert st.read_bytes("d/file.bin") == b"old"  # never replaced by a partial file
    assert st.ls("d") == ["file.bin"]
    assert not [p for p in st.fs.find(st.path("d")) if ".tmp-" in p]


@both
def test_sweep_tmp_removes_crash_leftovers(store_url):
    st = Store.open(store_url)
    st.write_bytes("a/keep.bin", b"k")
    with st.fs.open(st.path("a/.tmp-deadbeef-part.parquet"), "wb") as f:  # a crashed writer's leftover
        f.write(b"partial")
    assert st.ls("a") == ["keep.bin"]
    assert st.sweep_tmp() == 1
    assert st.read_bytes("a/keep.bin") == b"k"


@both
def test_parquet_through_store_reads_with_pyarrow_dataset(store_url):
    st = Store.open(store_url) / "r"
    t = pa.table({"x": list(range(10))})
    for i in range(3):
        with st.open_write(f"acts/h/part-{i:05d}.parquet") as f:
            pq.write_table(t, f)
    fs, root = st.arrow_fs()
    ds = pads.dataset(f"{root}/acts/h", filesystem=fs, format="parquet")
    assert ds.count_rows() == 30


@both
def test_manifest_create_and_reload(store_url):
    st = Store.open(store_url) / "runA"
    m = Manifest.load_or_create(st, "runA", {"name": "runA"}, "h1")
    m.set_stage("harvest", status="done", wall_s=1.5)
    m2 = Manifest.load(st)
    assert m2.stage_done("harvest") and m2.data["stages"]["harvest"]["wall_s"] == 1.5
    with pytest.raises(InputError, match="belongs to run 'runA'"):
        Manifest.load_or_create(st, "other", {}, "h2")


def test_s3_store_uses_explicit_endpoint_and_credentials(moto_endpoint, s3_url, monkeypatch):
    # With the environment gone, the spec's store section alone must reach the endpoint.
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    st = Store.open(s3_url, endpoint_url=moto_endpoint, region="us-east-1", key="testing", secret="testing")
    st.write_bytes("x.txt", b"hello")
    assert st.read_bytes("x.txt") == b"hello"
    assert "testing" not in repr(st)  # credentials stay out of reprs and logs


@pytest.mark.parametrize("bad,msg", [
    ("ftp://h/x", "unsupported store URL scheme"), ("s3://A/x", "not a valid S3 bucket"),
    ("file://rel/path", "absolute path"), ("", "empty"),
])
def test_bad_urls(bad, msg):
    with pytest.raises(InputError, match=msg):
        Store(bad)

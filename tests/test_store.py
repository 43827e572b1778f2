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
    m.data["targets"]["m@main"] = {"model": "m", "revision": "main", "folder": "targets/m@main", "stages": {}}
    m.set_stage("m@main", "harvest", status="done", wall_s=1.5, result={"rows": 3})
    m.set_stage(None, "report", status="done")
    m2 = Manifest.load(st)
    assert m2.result("m@main", "harvest") == {"rows": 3} and m2.stage("m@main", "harvest")["wall_s"] == 1.5
    assert m2.stage(None, "report")["status"] == "done" and m2.result("m@main", "train") is None
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


MiB = 2**20


def _multipart(st: Store) -> Store:
    """Force multipart uploads from 5 MiB on (s3fs's minimum part size) instead of 50 MiB."""
    st.fs.default_block_size = 5 * MiB
    return st


def _pending_uploads(st: Store) -> list:
    return st.fs.list_multipart_uploads(st.root.split("/", 1)[0])


# a discarded file must be closed for good: its __del__ must neither commit nor fail
no_del_errors = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@no_del_errors
def test_s3_failed_multipart_write_is_aborted(s3_url):
    st = _multipart(Store.open(s3_url))
    st.write_bytes("d/big.bin", b"old")
    with pytest.raises(RuntimeError):
        with st.open_write("d/big.bin") as f:
            f.write(b"a" * (6 * MiB))          # over the block size: multipart started, part 1 sent
            assert f.mpu is not None and len(f.parts) == 1
            f.write(b"b" * (3 * MiB))
            raise RuntimeError("crash mid-write")
    assert st.read_bytes("d/big.bin") == b"old"
    assert _pending_uploads(st) == []          # aborted, not left dangling
    with pytest.raises(RuntimeError):          # a new key: nothing appears at all
        with st.open_write("d/new.bin") as f:
            f.write(b"a" * (6 * MiB))
            raise RuntimeError("crash mid-write")
    assert st.ls("d") == ["big.bin"] and _pending_uploads(st) == []


@no_del_errors
def test_s3_failed_small_write_sends_nothing(s3_url):
    st = Store.open(s3_url)
    with pytest.raises(RuntimeError):
        with st.open_write("d/small.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    import gc

    gc.collect()                               # the discarded file's __del__ must not commit it either
    assert not st.exists("d/small.bin") and st.ls("d") == []


def test_s3_big_write_lands_whole_without_copies(s3_url):
    st = _multipart(Store.open(s3_url))
    data = bytes(range(256)) * (12 * MiB // 256) + b"tail"  # 3 parts: 5 + 5 + 2 MiB
    calls = []
    st.fs.s3.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    with st.open_write("d/big.bin") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    assert st.read_bytes("d/big.bin") == data
    assert calls[:1] == ["CreateMultipartUpload"] and calls.count("UploadPart") == 3
    assert "CompleteMultipartUpload" in calls and "CopyObject" not in calls and "DeleteObject" not in calls
    assert st.ls("d") == ["big.bin"] and _pending_uploads(st) == []

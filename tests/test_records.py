"""Per-unit run records on a local folder and on S3 (moto server): same code."""
from __future__ import annotations

import pytest

from saeray.bench.store_writes import CountingStore, hookpoints, unit_record
from saeray.run.records import Records
from saeray.store import Store

both = pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)


def rec(i: int) -> dict:
    return {"rows": i, "files": {"resid_post.0": {"path": f"acts/resid_post.0/part-{i:05d}.parquet", "bytes": 10 * i}}}


@both
def test_put_names_load_roundtrip(store_url):
    r = Records(Store.open(store_url) / "run", "harvest")
    assert r.names() == set() and r.load() == {}
    for i in (3, 1, 2):
        r.put(f"{i:05d}", rec(i))
    assert r.names() == {"00001", "00002", "00003"}
    loaded = r.load()
    assert list(loaded) == ["00001", "00002", "00003"] and loaded["00002"] == rec(2)
    assert Records(Store.open(store_url) / "run", "train").names() == set()  # stages are separate


@both
def test_consolidate_then_more_puts(store_url):
    st = Store.open(store_url) / "run"
    r = Records(st, "harvest")
    for i in range(4):
        r.put(f"{i:05d}", rec(i))
    assert r.consolidate() == {f"{i:05d}": rec(i) for i in range(4)}
    assert st.ls("_records/harvest") == [] and st.exists("_records/harvest.json")
    r.put("00004", rec(4))
    r.put("00005", rec(5))
    assert r.names() == {f"{i:05d}" for i in range(6)}
    assert r.load() == {f"{i:05d}": rec(i) for i in range(6)}
    assert r.consolidate() == r.load() == {f"{i:05d}": rec(i) for i in range(6)}
    assert st.ls("_records/harvest") == []
    assert r.consolidate() == r.load()            # nothing new: no rewrite, nothing lost
    r.clear()
    assert r.names() == set() and not st.exists("_records/harvest.json")


@both
def test_crash_between_consolidate_write_and_deletes(store_url):
    st = Store.open(store_url) / "run"
    r = Records(st, "harvest")
    for i in range(3):
        r.put(f"{i:05d}", rec(i))
    # consolidate wrote its file, then died before deleting the per-unit files
    st.write_json("_records/harvest.json", {f"{i:05d}": rec(i) for i in range(3)})
    r.put("00003", rec(3))                        # and the stage went on after a restart
    assert r.names() == {f"{i:05d}" for i in range(4)}
    assert r.load() == {f"{i:05d}": rec(i) for i in range(4)}   # no loss, no duplicate
    assert r.consolidate() == {f"{i:05d}": rec(i) for i in range(4)}
    assert st.ls("_records/harvest") == [] and st.read_json("_records/harvest.json") == r.load()


@both
def test_unfinished_write_is_not_a_record(store_url):
    st = Store.open(store_url) / "run"
    r = Records(st, "harvest")
    r.put("00000", rec(0))
    with pytest.raises(RuntimeError):
        with st.open_write("_records/harvest/00001.json") as f:
            f.write(b'{"rows": ')
            raise RuntimeError("crash mid-write")
    with st.fs.open(st.path("_records/harvest/.tmp-deadbeef-00002.json"), "wb") as f:  # an old crash's leftover
        f.write(b'{"rows": ')
    assert r.names() == {"00000"} and r.load() == {"00000": rec(0)}


def test_bytes_per_put_stay_constant(tmp_path):
    st = CountingStore(str(tmp_path / "store"))
    r = Records(st, "harvest")
    hps = hookpoints(72)
    sizes = []
    for i in range(400):
        before = st.bytes_written
        r.put(f"{i:05d}", unit_record(f"{i:05d}", hps))
        sizes.append(st.bytes_written - before)
    assert sizes[0] > 10_000 and len(set(sizes)) == 1   # unit 400 costs what unit 1 did
    mark, files = st.bytes_written, st.files_written
    r.consolidate()
    assert st.files_written == files + 1 and st.bytes_written - mark > 400 * sizes[0]  # one write of them all
    mark = st.bytes_written
    r.put("00400", unit_record("00400", hps))
    assert st.bytes_written - mark == sizes[0]          # and a put after it costs the same again


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "../x", "-x"])
def test_bad_names(tmp_path, bad):
    with pytest.raises(ValueError, match="must be one path component"):
        Records(Store.open(str(tmp_path)), "harvest").put(bad, {})
    with pytest.raises(ValueError, match="stage name"):
        Records(Store.open(str(tmp_path)), bad)


def test_load_survives_a_concurrent_consolidate(tmp_path):
    st = Store.open(str(tmp_path / "store"))
    r, other = Records(st, "harvest"), Records(st, "harvest")
    for i in range(3):
        r.put(f"{i:05d}", rec(i))
    listed = r._listed

    def listed_then_consolidated():  # another process consolidates right after our listing
        names = listed()
        other.consolidate()
        return names

    r._listed = listed_then_consolidated
    assert r.load() == {f"{i:05d}": rec(i) for i in range(3)}

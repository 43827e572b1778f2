"""`saeray bench store` in a tiny configuration: per-unit records grow linearly, the old manifest
rewrite quadratically; the store sends each byte to S3 once, the old temp + mv policy twice."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saeray.bench.store_writes import (MiB, StoreBenchConfig, counting_store, hookpoints, manifest_rewrite_policy,
                                       parse_s3_files, run_bench, unit_name, unit_record)
from saeray.errors import InputError


def test_bench_store_figures():
    cfg = StoreBenchConfig(units=(6, 60), hookpoints=6, s3_files=((3, MiB // 4), (1, 6 * MiB)))
    res = run_bench(cfg)
    rb = res["record_bytes"]
    assert rb["records_ratio"] < 15 and rb["manifest_rewrite_ratio"] > 50
    assert rb["records"]["60"]["put_bytes_first"] == rb["records"]["60"]["put_bytes_last"]
    s3 = res["s3"]
    assert s3["data_bytes"] == 3 * (MiB // 4) + 6 * MiB
    assert s3["store"]["s3_bytes_per_data_byte"] == pytest.approx(1.0, rel=0.01)
    assert s3["old_tmp_then_mv"]["s3_bytes_per_data_byte"] == pytest.approx(2.0, rel=0.01)
    # the harvest's own path (pool worker + harvest job + records): each activation byte sent once,
    # plus a few kB of records; no copies
    h = res["harvest_s3"]
    assert 1.0 <= h["s3_bytes_per_act_byte"] < 1.01 and "CopyObject" not in h["calls"]
    assert "CopyObject" not in s3["store"]["calls"] and s3["old_tmp_then_mv"]["calls"]["CopyObject"] == 4


def test_manifest_rewrite_sink_counts_what_disk_would_get(tmp_path):
    """The old policy's bytes go to a sink in the bench; written for real they are the same."""
    sink = manifest_rewrite_policy(counting_store(str(tmp_path / "sink"), persist=False), 12, 5)
    disk_store = counting_store(str(tmp_path / "disk"))
    disk = manifest_rewrite_policy(disk_store, 12, 5)
    assert sink["bytes"] == disk["bytes"] and sink["files"] == disk["files"] == 12
    hps = hookpoints(5)
    want = {"units": {unit_name(i): unit_record(unit_name(i), hps) for i in range(12)}}
    assert disk_store.read_json("manifest.json") == want
    assert disk_store.size("manifest.json") == disk["last_document_bytes"]


def test_multipart_is_counted_too():
    res = run_bench(StoreBenchConfig(units=(2,), hookpoints=1, s3_files=((1, 51 * MiB),)))  # over s3fs's 50 MiB block
    s3 = res["s3"]["store"]
    assert s3["calls"]["CreateMultipartUpload"] == s3["calls"]["CompleteMultipartUpload"] == 1
    assert "PutObject" not in s3["calls"] and s3["bytes_by_call"]["UploadPart"] == 51 * MiB
    assert s3["s3_bytes_per_data_byte"] == pytest.approx(1.0, rel=0.01)
    assert "n_ratio" not in res["record_bytes"]   # one N: no ratio to report


def test_parse_s3_files():
    assert parse_s3_files("20x1, 2x64,") == ((20, MiB), (2, 64 * MiB))
    assert parse_s3_files("1x0.5") == ((1, MiB // 2),)


@pytest.mark.parametrize("text", ["20", "0x1", "2x0", "ax1", "", ","])
def test_bad_s3_files(text):
    with pytest.raises(InputError, match="--s3-files"):
        parse_s3_files(text)


def test_cli_bad_units_and_json():
    cmd = [sys.executable, "-m", "saeray", "bench", "store"]
    r = subprocess.run(cmd + ["--units", "10,x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--units" in r.stderr
    r = subprocess.run(cmd + ["--units", "2,20", "--hookpoints", "3", "--no-s3", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OLD policy" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bench"] == "store" and "s3" not in res and res["record_bytes"]["records_ratio"] < 15

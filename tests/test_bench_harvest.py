"""`saeray bench harvest --json` end to end through the CLI, in a tiny configuration: a real
local Ray, a real moto server started by the bench, real Parquet written and read back."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.dataset as pads
import pytest


@pytest.mark.slow
def test_bench_harvest_json(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "saeray", "--log-level", "WARNING", "bench", "harvest", "--models", "storyworld",
           "--docs", "48", "--batch-size", "8", "--memory-docs", "8", "--workdir", str(work), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "b/a" in r.stdout  # the human table comes first
    assert res["bench"] == "harvest" and set(res["models"]) == {"storyworld"}
    m = res["models"]["storyworld"]
    fwd, b, c = m["forward"], m["local"], m["s3"]
    assert m["hookpoints"] == 4 and m["shape"]["d_model"] == 128 and m["docs"] == 48

    # the same tokens went through (a), (b) and (c): rows per hook point = tokens forwarded
    assert fwd["tokens"] == b["rows"] == c["rows"] > 48 * 50   # storyworld docs are ~100 tokens
    assert fwd["contexts"] == 48 and len(fwd["runs_tokens_per_s"]) == 3
    for x in (fwd["tokens_per_s"], b["tokens_per_s"], c["tokens_per_s"], b["tokens_per_s_e2e"], b["mb_per_s"]):
        assert x > 0
    # ratios are what they say
    a_b = sum(fwd["runs_tokens_per_s"][:2]) / 2
    assert m["b_over_a"] == pytest.approx(b["tokens_per_s"] / a_b, rel=1e-2)
    assert m["c_over_a"] == pytest.approx(c["tokens_per_s"] / (sum(fwd["runs_tokens_per_s"][1:]) / 2), rel=1e-2)
    # end-to-end includes start-up, so it cannot beat the steady rate
    assert b["tokens_per_s_e2e"] <= b["tokens_per_s"] * 1.01 and b["startup_s"] > 0

    # bytes: 4 hook points x 128 float16 values per token, plus doc/pos/token and Parquet framing
    assert b["bytes"] == c["bytes"]                   # same encoder, same rows -> same files on S3
    assert b["bytes_per_token"] == pytest.approx(b["bytes"] / b["rows"], abs=0.1)
    assert 0.8 * 4 * 128 * 2 <= b["bytes_per_token"] < 4 * (128 * 2 + 64)
    assert b["mb_per_s"] == pytest.approx(b["tokens_per_s"] * b["bytes_per_token"] / 1e6, rel=2e-2)
    # and the bytes are really there: the run folder the bench kept holds exactly those rows and bytes
    run = b["run"]
    files = list((tmp_path / "work").rglob("part-*.parquet"))
    mine = [f for f in files if str(f).startswith(run)]
    assert sum(f.stat().st_size for f in mine) == b["bytes"]
    t = pads.dataset(f"{run}/acts/resid_post.3", format="parquet").to_table()
    assert t.num_rows == b["rows"] and t.schema.field("act").type.list_size == 128

    # driver memory: peaks reported for N and 10 N documents, ratio consistent
    mem = res["memory"]
    assert mem["n"]["docs"] == 8 and mem["10n"]["docs"] == 80 and mem["10n"]["rows"] > 9 * mem["n"]["rows"]
    assert mem["peak_ratio"] == pytest.approx(mem["10n"]["rss_peak_mb"] / mem["n"]["rss_peak_mb"], abs=1e-3)
    assert mem["flat"] == (mem["peak_ratio"] <= 1.10)
    for k in ("n", "10n"):
        assert mem[k]["rss_peak_mb"] >= mem[k]["rss_start_mb"] > 50

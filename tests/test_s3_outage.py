"""S3 faults against a real moto server behind a fault-injecting proxy (tests/s3proxy.py).

An outage is the proxy going down (connections refused, connections in flight dropped), not moto
stopping: moto keeps its buckets in memory and a restart would lose them, which no real outage
does. Throttling and 5xx are the proxy answering requests itself with S3 error bodies.

Unit level: the Store rides out a short outage and 503 / 500 / SlowDown answers within its retry
budget; a longer outage fails with one clear SaerayError within a bounded time; the start-of-run
check (:meth:`Store.check_writable`) turns no credentials, rejected credentials, a missing bucket
and an unreachable endpoint into exit-2 messages through the real CLI. Slow: a harvest and SAE
training through the proxy with the store going down mid-stage, ridden out or failed and
re-run, ending with exactly the rows and weights of a run that had no outage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest

from saeray.errors import InputError, SaerayError
from saeray.store import Store
from saeray.storefaults import RetryPolicy, StoreUnavailable


@pytest.fixture
def bucket(moto_endpoint):
    name = f"o-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


def keys(moto_endpoint, bucket, prefix="") -> list[str]:
    """The bucket's keys, read from moto directly (not through the proxy)."""
    out = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def after(seconds: float, fn) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


# ---- unit level ------------------------------------------------------------------------------


def test_retry_budget_numbers_are_the_documented_ones():
    p = RetryPolicy()
    assert p.attempts == 10 and p.span() == pytest.approx(28.7)          # 0.1 .. 6.4, 8, 8 s
    assert RetryPolicy(attempts=3).span() == pytest.approx(0.3)
    assert all(0.8 * min(0.1 * 2 ** i, 8) <= p.pause(i) <= 1.2 * min(0.1 * 2 ** i, 8) for i in range(12))


def test_store_rides_out_a_short_outage(s3_proxy, bucket, moto_endpoint):
    st = Store.open(f"s3://{bucket}/runs", endpoint_url=s3_proxy.url)
    st.write_bytes("a/first.json", b"1")
    for op in ("write", "read", "ls", "exists", "arrow"):
        s3_proxy.down()
        t = after(2.5, s3_proxy.up)
        t0 = time.monotonic()
        if op == "write":
            st.write_bytes("a/second.json", b"2")
        elif op == "read":
            assert st.read_bytes("a/first.json") == b"1"
        elif op == "ls":
            assert st.ls("a") == ["first.json", "second.json"]
        elif op == "exists":
            assert st.exists("a/second.json")
        else:
            import pyarrow.fs as pafs

            fs, root = st.arrow_fs()
            assert fs.get_file_info(pafs.FileSelector(f"{root}/a")) and True
        waited = time.monotonic() - t0
        t.join()
        assert 2.0 < waited < 20, (op, waited)   # it really waited for the store to come back
    assert keys(moto_endpoint, bucket) == ["runs/a/first.json", "runs/a/second.json"]


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"),
                                         (429, "TooManyRequests")])
def test_throttling_and_5xx_are_retried(s3_proxy, bucket, moto_endpoint, status, code):
    st = Store.open(f"s3://{bucket}/runs", endpoint_url=s3_proxy.url)
    s3_proxy.errors(4, status, code)
    st.write_bytes("x.json", b"{}")
    assert s3_proxy.answered == 4                      # four answered with the error, the fifth went through
    assert keys(moto_endpoint, bucket) == ["runs/x.json"]
    s3_proxy.errors(3, status, code)
    assert st.read_bytes("x.json") == b"{}" and s3_proxy.answered == 7


def test_multipart_upload_rides_out_errors_between_parts(s3_proxy, bucket, moto_endpoint):
    """A big object goes up in parts; a failed part is retried alone and the object appears whole."""
    st = Store.open(f"s3://{bucket}/runs", endpoint_url=s3_proxy.url)
    data = os.urandom(12 << 20)
    with st.open_write("big.bin") as f:
        f.write(data[: 6 << 20])                       # > s3fs's 5 MiB block: the first part goes up now
        s3_proxy.errors(3, 503, "SlowDown")
        f.write(data[6 << 20:])
    assert s3_proxy.answered == 3
    got = boto3.client("s3", endpoint_url=moto_endpoint).get_object(Bucket=bucket, Key="runs/big.bin")["Body"].read()
    assert got == data


def test_outage_beyond_the_budget_fails_clearly_and_in_bounded_time(s3_proxy, bucket):
    st = Store.open(f"s3://{bucket}/runs", endpoint_url=s3_proxy.url, retries=4)
    st.write_bytes("kept.json", b"1")
    s3_proxy.down()
    for op in (lambda: st.write_bytes("lost.json", b"2"), lambda: st.read_bytes("kept.json"), lambda: st.ls("")):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as ei:
            op()
        assert time.monotonic() - t0 < 15            # 4 attempts: 0.7 s of pauses, refused connections
        msg = str(ei.value)
        assert isinstance(ei.value, SaerayError) and not isinstance(ei.value, InputError)   # exit 1
        for part in (f"s3://{bucket}/runs", f"store.endpoint_url {s3_proxy.url}", "4 attempts", "store.retries",
                     "re-run the same command", "resumes"):
            assert part in msg, (part, msg)
        assert "\n" not in msg and "Traceback" not in msg
    s3_proxy.up()
    assert st.read_bytes("kept.json") == b"1" and not st.exists("lost.json")  # the failed write left nothing


def test_check_writable_touches_nothing_and_names_the_problem(s3_proxy, bucket, moto_endpoint, tmp_path):
    st = Store.open(f"s3://{bucket}/runs", endpoint_url=s3_proxy.url)
    st.write_bytes("run/manifest.json", b"{}")
    st.check_writable()
    assert keys(moto_endpoint, bucket) == ["runs/run/manifest.json"]          # the probe is gone, nothing else moved
    # a missing bucket: how to create it
    with pytest.raises(InputError, match=r"bucket 'nope-[0-9a-f]+' of store.url .* does not exist .*aws s3 mb"):
        Store.open(f"s3://nope-{uuid.uuid4().hex[:8]}/runs", endpoint_url=s3_proxy.url).check_writable()
    # credentials the service rejects (moto accepts any, so the proxy answers as S3 would)
    s3_proxy.errors(1, 403, "InvalidAccessKeyId")
    with pytest.raises(InputError, match=r"rejected the credentials .*InvalidAccessKeyId.*store.key and store.secret"):
        st.check_writable()
    s3_proxy.errors(1, 403, "AccessDenied")
    with pytest.raises(InputError, match=r"access to .* was denied .*s3:PutObject"):
        st.check_writable()
    # unreachable: a short budget, then a configuration error (exit 2), not a 30 s wait
    s3_proxy.down()
    t0 = time.monotonic()
    with pytest.raises(InputError, match=rf"cannot reach store.endpoint_url {s3_proxy.url} for store.url "
                                         rf"s3://{bucket}/runs.*nothing was written"):
        st.check_writable()
    assert time.monotonic() - t0 < 10
    s3_proxy.up()
    assert keys(moto_endpoint, bucket) == ["runs/run/manifest.json"]
    # local folders: probed where they exist, nothing created for a failed start
    ro = tmp_path / "ro"
    ro.mkdir()
    Store.open(str(ro / "runs" / "deeper")).check_writable()
    assert list(ro.iterdir()) == []
    if os.geteuid() != 0:
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match=r"store folder .*ro/runs cannot be written"):
                Store.open(str(ro / "runs")).check_writable()
        finally:
            ro.chmod(0o700)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        Store.open(str(tmp_path / "afile" / "runs")).check_writable()


def _cli_spec(tmp_path, model: str, store: dict, name: str = "cli") -> str:
    d = {"name": name, "model": {"name": model}, "corpus": {"n_docs": 16, "context_len": 32, "heldout_docs": 4},
         "hookpoints": ["resid_post.1"], "harvest": {"batch_size": 8, "unit_contexts": 8},
         "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}]},
         "store": store, "resources": {"harvest": {"num_cpus": 0.5}}}
    p = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(json.dumps(d))
    return str(p)


def _no_credentials_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}
    (tmp_path / "empty").write_text("")
    env.update(AWS_CONFIG_FILE=str(tmp_path / "empty"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "empty"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.mark.parametrize("case", ["no-credentials", "missing-bucket", "unreachable"])
def test_cli_start_of_run_store_problems_exit_2(case, s3_proxy, bucket, moto_endpoint, tiny_model, tmp_path):
    url = f"s3://{bucket}/runs"
    env = dict(os.environ)
    if case == "no-credentials":
        env = _no_credentials_env(tmp_path)
        want = "no S3 credentials were found"
    elif case == "missing-bucket":
        url = f"s3://missing-{uuid.uuid4().hex[:8]}/runs"
        want = "does not exist"
    else:
        s3_proxy.down()
        want = "cannot reach store.endpoint_url"
    spec = _cli_spec(tmp_path, tiny_model, {"url": url, "endpoint_url": s3_proxy.url})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "saeray", "harvest", spec], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert want in r.stderr and "store." in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "botocore.exceptions" not in r.stderr, r.stderr
    assert keys(moto_endpoint, bucket) == []           # nothing written, not even a lease
    assert time.monotonic() - t0 < 120


# ---- outages in the middle of a stage (slow) -------------------------------------------------

TARGET = "neox@main"


def _outage_spec(tiny_model, bucket, endpoint, name, retries=10, **train) -> dict:
    # an outage the run rides out must be shorter than its lease: no renewal gets through meanwhile,
    # and a lease that expires stops the run (rightly). A run the outage stops cannot release its
    # lease; its re-run on this machine takes it over at once (saeray.run.lease.holder_gone)
    lease = 60
    return {"name": name, "model": {"name": tiny_model},
            "corpus": {"n_docs": 160, "context_len": 32, "heldout_docs": 8},
            "hookpoints": ["resid_post.1", "resid_post.3"],
            "harvest": {"batch_size": 4, "unit_contexts": 8, "max_in_flight": 1},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    "train": {"tokens": 60_000, "batch_size": 100, "checkpoint_every": 20, **train}},
            "store": {"url": f"s3://{bucket}/runs", "endpoint_url": endpoint, "retries": retries, "lease_seconds": lease},
            "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5}}}


def _acts(moto_endpoint, bucket, name, hp):
    """(rows, the table sorted by doc, pos) of one hook point's Parquet dataset, read from moto directly."""
    import pyarrow.dataset as pads

    st = Store.open(f"s3://{bucket}/runs/{name}/targets/{TARGET}", endpoint_url=moto_endpoint)
    fs, root = st.arrow_fs()
    t = pads.dataset(f"{root}/acts/{hp}", filesystem=fs, format="parquet").to_table()
    return t.num_rows, t.sort_by([("doc", "ascending"), ("pos", "ascending")])


def _harvest_records(moto_endpoint, bucket, name) -> int:
    return len(keys(moto_endpoint, bucket, f"runs/{name}/targets/{TARGET}/_records/harvest/"))


def _records(moto_endpoint, bucket, name) -> dict:
    from saeray.run.records import Records

    return Records(Store.open(f"s3://{bucket}/runs/{name}/targets/{TARGET}", endpoint_url=moto_endpoint),
                   "harvest").load()


def _harvest_cli(ray_local, spec_path, **kw) -> subprocess.Popen:
    address = ray_local.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "saeray", "--address", address, "harvest", spec_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(pred, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None) and not pred():
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def harvest_reference(ray_local, tiny_model, moto_endpoint, tmp_path_factory):
    """The same harvest with no outage: the rows every outage run must end with."""
    from saeray.run.audit import open_run, run_targets
    from saeray.spec import parse_spec

    name = f"o-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    run_targets(open_run(parse_spec(json.dumps(_outage_spec(tiny_model, name, moto_endpoint, "ref")))), ["harvest"])
    return {hp: _acts(moto_endpoint, name, "ref", hp) for hp in ("resid_post.1", "resid_post.3")}, \
        _records(moto_endpoint, name, "ref")


def _assert_exact(moto_endpoint, bucket, name, reference):
    import numpy as np

    ref_acts, ref_records = reference
    recs = _records(moto_endpoint, bucket, name)
    assert sorted(recs) == sorted(ref_records)                 # every unit recorded once
    total = sum(r["rows"] for r in recs.values())
    assert total == sum(r["rows"] for r in ref_records.values()) > 0
    for hp, (rows, table) in ref_acts.items():
        got_rows, got = _acts(moto_endpoint, bucket, name, hp)
        assert got_rows == rows == total, hp                   # no row lost, none duplicated
        for col in ("doc", "pos"):
            np.testing.assert_array_equal(got[col].to_numpy(), table[col].to_numpy())
        assert got["act"].equals(table["act"]), hp


@pytest.mark.slow
def test_harvest_rides_out_a_short_outage(ray_local, tiny_model, s3_proxy, bucket, moto_endpoint, tmp_path,
                                          harvest_reference):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(_outage_spec(tiny_model, bucket, s3_proxy.url, "short")))
    t0 = time.monotonic()
    proc = _harvest_cli(ray_local, str(spec))
    assert _wait_for(lambda: _harvest_records(moto_endpoint, bucket, "short") >= 2, proc), proc.communicate()
    s3_proxy.down()
    at_down = _harvest_records(moto_endpoint, bucket, "short")
    time.sleep(6)                                   # well inside the 28.7 s budget of the default 10 attempts
    s3_proxy.up()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert at_down < len(harvest_reference[1]), "the outage must hit the harvest in its middle"
    _assert_exact(moto_endpoint, bucket, "short", harvest_reference)
    print(f"short outage: {at_down}/{len(harvest_reference[1])} units done when the store went down for 6 s; "
          f"harvest finished, exit 0, in {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_harvest_fails_clearly_in_a_long_outage_then_resumes_exactly(ray_local, tiny_model, s3_proxy, bucket,
                                                                     moto_endpoint, tmp_path, harvest_reference):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(_outage_spec(tiny_model, bucket, s3_proxy.url, "long", retries=3)))
    proc = _harvest_cli(ray_local, str(spec))
    assert _wait_for(lambda: _harvest_records(moto_endpoint, bucket, "long") >= 2, proc), proc.communicate()
    s3_proxy.down()
    at_down = _harvest_records(moto_endpoint, bucket, "long")
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=300)        # the store stays down until the run has given up
    failed_after = time.monotonic() - t0
    assert proc.returncode == 1, err[-3000:]
    assert "did not answer" in err and "re-run the same command" in err and "store.retries = 3" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    done = _harvest_records(moto_endpoint, bucket, "long")
    assert done < len(harvest_reference[1]), "the outage must stop the harvest before its end"
    s3_proxy.up()
    r = subprocess.run([sys.executable, "-m", "saeray", "--address", ray_local.get_runtime_context().gcs_address,
                        "harvest", str(spec)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_exact(moto_endpoint, bucket, "long", harvest_reference)
    print(f"long outage: down at {at_down} units; the harvest gave up {failed_after:.0f} s later with exit 1 "
          f"({done} units kept); the re-run resumed to the exact rows")


def _weights(moto_endpoint, bucket, name, hp="resid_post.1") -> dict:
    from safetensors.numpy import load

    body = boto3.client("s3", endpoint_url=moto_endpoint).get_object(
        Bucket=bucket, Key=f"runs/{name}/targets/{TARGET}/saes/{hp}/topk-w64-k4/sae_weights.safetensors")["Body"]
    return load(body.read())


@pytest.mark.slow
def test_training_checkpoints_ride_out_an_outage_or_fail_and_resume(ray_local, tiny_model, s3_proxy, bucket,
                                                                     moto_endpoint):
    """Training through the proxy: the store goes down once the first checkpoint exists, (a) for
    6 s with the default budget: training waits and ends with the reference's exact weights;
    (b) with store.retries 3 until the stage fails: a clear error, then a re-run resumes from the
    checkpoint to a finished SAE."""
    import numpy as np

    from saeray.run.audit import open_run, run_targets
    from saeray.spec import parse_spec

    def rc_of(name, endpoint, retries=10):
        d = _outage_spec(tiny_model, bucket, endpoint, name, retries=retries)
        d["hookpoints"] = ["resid_post.1"]
        return open_run(parse_spec(json.dumps(d)))

    ref = rc_of("tref", moto_endpoint)
    run_targets(ref, ["train"])
    want = _weights(moto_endpoint, bucket, "tref")
    for name, retries in (("tshort", 10), ("tlong", 3)):
        rc = rc_of(name, s3_proxy.url, retries)
        run_targets(rc, ["harvest"])
        ckpt = f"runs/{name}/targets/{TARGET}/saes/resid_post.1/_checkpoint/checkpoint.pt"
        result: dict = {}

        def train(rc=rc):
            try:
                result["out"] = run_targets(rc, ["train"])
            except BaseException as e:  # noqa: BLE001 - handed to the test
                result["err"] = e

        th = threading.Thread(target=train)
        th.start()
        assert _wait_for(lambda: ckpt in keys(moto_endpoint, bucket, ckpt), None, timeout=300)
        s3_proxy.down()
        if retries == 10:
            time.sleep(6)
            s3_proxy.up()
            th.join(600)
            assert "out" in result, result
            got = _weights(moto_endpoint, bucket, name)
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        else:
            th.join(600)
            s3_proxy.up()
            err = result.get("err")
            assert err is not None and not th.is_alive(), result
            from saeray.cli import _cause

            cause = _cause(err)
            assert isinstance(cause, SaerayError), repr(err)[:2000]
            assert "re-run" in str(cause), str(cause)
            rc2 = rc_of(name, s3_proxy.url, retries)
            run_targets(rc2, ["train"])
            got = _weights(moto_endpoint, bucket, name)
            assert got.keys() == want.keys()
            for k in want:                          # resumed from a checkpoint: the same SAE, to float tolerance
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)

"""Scheduled series without Ray: the spec's series and alerts sections, run names, the index on a
local folder and on S3 (moto), decoder matching, alert thresholds and the webhook (a real HTTP
receiver on 127.0.0.1)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import WebhookReceiver
from saeray.errors import InputError
from saeray.schedule import alerts
from saeray.schedule.diff import match_features
from saeray.schedule.series import Series, check_date, run_name
from saeray.spec import parse_spec
from saeray.store import Store

BASE = {"name": "nightly", "model": {"name": "storyworld-tiny-2l"}, "hookpoints": ["resid_post.0"]}


def spec(**over):
    return parse_spec(json.dumps({**BASE, **over}))


@pytest.mark.parametrize("over, msg", [
    ({"alerts": {"fvu_rise": 0.1}}, "alerts: compare a run with the previous run of its series"),
    ({"series": {"run_name": "{name}-{when}"}}, r"series.run_name: unknown field \{when\}"),
    ({"series": {"run_name": "{name}-nightly"}}, r"series.run_name: needs \{date\} or \{revision\}"),
    ({"series": {"run_name": "{name}/{date}"}}, "series.run_name: may hold only letters"),
    ({"series": {"keep_activations": 0}}, "series.keep_activations"),
    ({"series": {}, "alerts": {"matched_share_below": 1.5}}, "alerts.matched_share_below"),
    ({"series": {}, "alerts": {"webhook_env": "https://hooks.example/T0K3N"}}, "alerts.webhook_env"),
])
def test_spec_refuses_bad_series_and_alerts(over, msg):
    with pytest.raises(InputError, match=msg):
        spec(**over)


def test_run_names():
    t = [SimpleNamespace(revision="step512", slug="storyworld-4l"), SimpleNamespace(revision="org/rev", slug="m2")]
    assert run_name("{name}-{date}-{revision}", "nightly", "2026-12-03", t[:1]) == "nightly-2026-12-03-step512"
    assert run_name("{model}_{revision}", "n", "2026-12-03", t) == "storyworld-4l+m2_step512+org_rev"
    assert check_date("2026-12-03") == "2026-12-03"
    with pytest.raises(InputError, match="--date: '2026-13-01' is not a date"):
        check_date("2026-13-01")
    with pytest.raises(InputError, match="shorten the template"):
        run_name("{name}-{revision}", "n" * 100, "2026-12-03", [SimpleNamespace(revision="r" * 40, slug="m")])


@pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)
def test_index_orders_runs_and_finds_the_previous(store_url):
    s = Series(Store.open(store_url) / "nightly", "nightly")
    s.put("n-2026-12-01", status="done", started="2026-12-01T01:00:00Z")
    s.put("n-2026-12-02", status="failed", started="2026-12-02T01:00:00Z")
    s.put("n-2026-12-03", status="alert", started="2026-12-03T01:00:00Z")
    s.put("n-2026-12-04", status="running", started="2026-12-04T01:00:00Z")
    idx = s.store.read_json("index.json")
    assert [e["run"] for e in idx["runs"]] == ["n-2026-12-01", "n-2026-12-02", "n-2026-12-03", "n-2026-12-04"]
    assert idx["runs"][0]["folder"] == "runs/n-2026-12-01"
    # the previous run is the newest *finished* one before it: a failed night is skipped
    assert s.previous("n-2026-12-04")["run"] == "n-2026-12-03"
    assert s.previous("n-2026-12-03")["run"] == "n-2026-12-01"
    assert s.previous("n-2026-12-01") is None
    # an update keeps the entry's place and start time; a lost index.json is rebuilt from the entries
    s.put("n-2026-12-01", status="alert")
    s.store.rm("index.json")
    s.put("n-2026-12-04", status="done")
    idx = s.store.read_json("index.json")
    assert [(e["run"], e["status"]) for e in idx["runs"]] == [("n-2026-12-01", "alert"), ("n-2026-12-02", "failed"),
                                                              ("n-2026-12-03", "alert"), ("n-2026-12-04", "done")]
    assert idx["runs"][0]["started"] == "2026-12-01T01:00:00Z"


def test_matching_self_permutation_and_unrelated():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 32))
    same, _ = match_features(w, w, 0.7)
    assert same["matched"] == 256 and same["matched_share"] == 1.0 and same["born"] == same["lost"] == 0
    assert same["mcs"] == pytest.approx(1.0, abs=1e-5)
    # indices do not carry identity: a permuted, rescaled, slightly noisy copy matches feature for feature
    perm = rng.permutation(256)
    w2 = 3.0 * w[perm] + 0.05 * rng.normal(size=w.shape)
    m, pairs = match_features(w, w2, 0.7)
    assert m["matched"] == 256
    assert all(perm[x["b"]] == x["a"] for x in m["most_changed"])
    assert pairs == {int(perm[j]): j for j in range(256)}
    # half the features replaced by new directions: those are born, the old ones lost
    w3 = w.copy()
    w3[:128] = rng.normal(size=(128, 32))
    m, _ = match_features(w, w3, 0.7)
    assert m["matched"] == 128 and m["born"] == 128 and m["lost"] == 128
    assert {x["b"] for x in m["born_examples"]} <= set(range(128))
    # a duplicated direction matches once (mutual nearest neighbours are one-to-one)
    w4 = np.concatenate([w[:1], w[:1]])
    m, _ = match_features(w[:1], w4, 0.7)
    assert m["matched"] == 1 and m["born"] == 1 and m["lost"] == 0
    # the input sizes must agree
    assert match_features(w, rng.normal(size=(8, 16)), 0.7)[0]["comparable"] is False


def _diff(**metric_deltas):
    metrics = {k: {"a": 0.9, "b": 0.9 + metric_deltas.get(k, 0.0), "delta": metric_deltas.get(k, 0.0)}
               for k in ("fvu", "l0", "ce_loss_recovered", "kl", "dead_frac")}
    return {"targets": [{"b": "m@step2", "saes": [{"hookpoint": "resid_post.1", "sae": "topk-w64-k4", "metrics": metrics,
                                                   "features": {"comparable": True, "matched_share": 0.4, "born": 6,
                                                                "lost": 5},
                                                   "influential": {"overlap": 0.5}}],
                         "concepts": [{"hookpoint": "resid_post.1", "by": "topk-w64-k4", "lost": ["place"], "gained": []},
                                      {"hookpoint": "resid_post.1", "by": "linear probe", "lost": [], "gained": ["x"]}]}]}


def test_alert_thresholds():
    A = spec(series={}, alerts={}).alerts
    assert alerts.check(_diff(ce_loss_recovered=-0.2), A) == []                  # no thresholds, no alerts
    A = spec(series={}, alerts={"ce_loss_recovered_drop": 0.1, "fvu_rise": 0.1, "matched_share_below": 0.5,
                                "influential_overlap_below": 0.4, "concepts_lost": ["place"]}).alerts
    got = alerts.check(_diff(ce_loss_recovered=-0.2, fvu=0.05), A)
    assert [a["rule"] for a in got] == ["ce_loss_recovered_drop", "matched_share_below", "concepts_lost"]
    assert "CE loss recovered fell 0.9 -> 0.7" in got[0]["message"] and got[2]["value"] == ["place"]
    # a rise is not a drop, a named concept that was not lost does not trip, 'all' names every concept
    A = spec(series={}, alerts={"ce_loss_recovered_drop": 0.1, "concepts_lost": ["time"]}).alerts
    assert alerts.check(_diff(ce_loss_recovered=0.3), A) == []
    A = spec(series={}, alerts={"concepts_lost": ["all"]}).alerts
    assert [a["rule"] for a in alerts.check(_diff(), A)] == ["concepts_lost"]


def test_webhook_retries_then_delivers_and_never_logs_the_url(caplog):
    caplog.set_level(logging.INFO, logger="saeray")
    r = WebhookReceiver([503, 503])
    try:
        res = alerts.post(r.url, {"n_alerts": 1}, backoff=0.01)
        assert res == {"sent": True, "status": 200, "tries": 3}
        assert len(r.posts) == 3 and r.posts[-1] == ("/hooks/T0K3N-secret", {"n_alerts": 1})
        r.codes = [400]                    # refused: not retried, not raised
        res = alerts.post(r.url, {"n_alerts": 1}, backoff=0.01)
        assert res["sent"] is False and res["tries"] == 1 and len(r.posts) == 4
    finally:
        r.close()
    # nobody listening: bounded tries, then a warning naming the host only
    res = alerts.post(r.url, {"n_alerts": 1}, retries=2, backoff=0.01, timeout=2)
    assert res["sent"] is False and res["tries"] == 2
    assert "T0K3N" not in caplog.text and "127.0.0.1" in caplog.text
    assert alerts.post("file:///etc/passwd", {})["sent"] is False


def test_every_job_spec_validates_and_the_nightly_one_is_a_series():
    from conftest import REPO
    from saeray.spec import load_spec

    for p in sorted((REPO / "jobs").glob("*.yaml")):
        load_spec(str(p))
    s = load_spec(str(REPO / "jobs" / "storyworld-nightly.yaml"))
    assert s.series is not None and s.alerts is not None and s.models[0].revisions == ["latest"]


@pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)
def test_retention_keeps_the_newest_finished_runs_and_never_touches_running_or_failed(store_url):
    from saeray.run.records import Records
    from saeray.schedule import retention

    s = Series(Store.open(store_url) / "nightly", "nightly")
    statuses = ["done", "alert", "failed", "done", "running", "done"]
    for i, status in enumerate(statuses):
        run = f"n{i}"
        st = s.run_store(run)
        st.write_json("manifest.json", {"run": run, "targets": {"m@s": {"folder": "targets/m@s", "stages": {
            "harvest": {"status": "done", "result": {"rows": 1}}}}}})
        st.write_bytes("targets/m@s/acts/resid_post.0/part-00000.parquet", b"x")
        st.write_bytes("targets/m@s/saes/resid_post.0/topk/sae_weights.safetensors", b"w")
        Records(st / "targets/m@s", "harvest").put("u00000", {"rows": 1})
        s.put(run, status=status, started=f"2026-12-0{i + 1}T00:00:00Z", activations=True)
    assert retention.apply(s, None) == []
    # keep 2: of the finished runs n0 n1 n3 n5, the newest two (n3, n5) keep theirs
    assert retention.apply(s, 2) == ["n0", "n1"]
    for i, status in enumerate(statuses):
        t = s.run_store(f"n{i}") / "targets/m@s"
        assert t.exists("acts/resid_post.0/part-00000.parquet") == (i not in (0, 1)), i
        assert t.exists("saes/resid_post.0/topk/sae_weights.safetensors")
        assert bool(Records(t, "harvest").names()) == (i not in (0, 1))
    m = s.run_store("n0").read_json("manifest.json")
    assert m["targets"]["m@s"]["stages"]["harvest"]["pruned"]   # a resume harvests again
    assert [e["activations"] for e in s.entries()] == [False, False, True, True, True, True]
    assert retention.apply(s, 2) == []                           # nothing left to do

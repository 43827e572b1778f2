"""What ``saeray audit`` adds for a run of a series, around the usual stages:

1. ``begin``: the run's index entry, status ``running``, with its resolved checkpoints;
2. ``diff_stage`` (after every stage, before the report): the diff with the previous finished run
   of the series, ``<run>/diff/previous.json``, and the alerts it raises under the spec's
   thresholds; the report then has a "Changes" page;
3. ``finish``: the entry's status (``done``, or ``alert`` when something tripped), the webhook
   (once per set of alerts: a retried or doubled submission does not post them again), then
   retention over the whole series;
4. ``failed``: on any error the entry says ``failed`` with the error's type and first line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from . import alerts as alerts_mod
from . import retention
from .diff import diff_runs

log = logging.getLogger("saeray")

DIFF = "diff/previous.json"


def begin(rc) -> None:
    rc.series.put(rc.name, status="running", date=rc.date, spec_hash=rc.spec.hash(), activations=True,
                  targets=[{"model": t.model, "revision": t.revision} for t in rc.targets],
                  finished=None, error=None, alerts=[])
    log.info(f"series {rc.series.name}: run {rc.name} ({', '.join(str(t) for t in rc.targets)}) at {rc.store.url}")


def diff_stage(rc) -> list[dict]:
    """The diff with the previous run and its alerts; [] for the first run of a series."""
    prev = rc.series.previous(rc.name)
    t0 = time.perf_counter()
    if prev is None:
        rc.store.rm(DIFF)
        rc.manifest.set_stage(None, "diff", status="done", previous=None, alerts=0, wall_s=0.0)
        log.info(f"series {rc.series.name}: {rc.name} is the first finished run; nothing to compare with")
        return []
    rc.manifest.set_stage(None, "diff", status="running", previous=prev["run"])
    s = rc.spec.series
    d = diff_runs(rc.series.run_store(prev["run"]), rc.store, s.match_threshold, s.top_influential,
                  mb=rc.manifest.data)
    d["alerts"] = alerts_mod.check(d, rc.resolved.alerts)
    rc.store.write_json(DIFF, d)
    rc.manifest.set_stage(None, "diff", status="done", previous=prev["run"], alerts=len(d["alerts"]),
                          wall_s=round(time.perf_counter() - t0, 2))
    for a in d["alerts"]:
        log.warning(f"ALERT {a['rule']}: {a['message']}")
    return d["alerts"]


def failed(rc, e: BaseException) -> None:
    msg = (str(e).splitlines() or [""])[0][:300]
    try:
        rc.series.put(rc.name, status="failed", error=f"{type(e).__name__}: {msg}", finished=None)
    except Exception as e2:  # noqa: BLE001 - the original error is the one to raise
        log.warning(f"series {rc.series.name}: could not mark run {rc.name} failed in the index ({e2})")


def _alerts_hash(alerts: list[dict]) -> str:
    return hashlib.sha256(json.dumps([a["message"] for a in alerts]).encode()).hexdigest()[:16]


def finish(rc, alerts: list[dict], report: str) -> dict:
    """Close the run's entry, post the alerts, apply retention; what the summary gains."""
    prev = (rc.manifest.data.get("stages", {}).get("diff") or {}).get("previous")
    entry = rc.series.put(rc.name, status="alert" if alerts else "done", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                          time.gmtime()), previous=prev, alerts=[a["message"] for a in alerts], report=report,
                          error=None)
    out: dict = {"series": rc.series.name, "run_name": rc.name, "previous": prev, "alerts": alerts}
    if alerts and rc.resolved.alerts is not None:
        var = rc.resolved.alerts.webhook_env
        url = os.environ.get(var)
        h = _alerts_hash(alerts)
        if not url:
            log.info(f"alerts: ${var} is not set, so no webhook was called")
        elif (entry.get("webhook") or {}).get("sent") and entry["webhook"].get("alerts") == h:
            log.info("alerts: the webhook already received these alerts for this run; not posted again")
            out["webhook"] = entry["webhook"]
        else:
            res = alerts_mod.post(url, alerts_mod.payload(rc.series.name, rc.name, prev, alerts, report))
            res["alerts"] = h
            rc.series.put(rc.name, webhook=res)
            log.info(f"alerts: webhook {alerts_mod.host_of(url)} {'received' if res['sent'] else 'did not receive'} "
                     f"{len(alerts)} alert(s)")
            out["webhook"] = res
    out["pruned"] = retention.apply(rc.series, rc.spec.series.keep_activations)
    out["index"] = rc.series.store.url_of("index.json")
    return out

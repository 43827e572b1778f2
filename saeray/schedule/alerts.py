"""Alerts: the spec's thresholds (``alerts:``) checked against a run's diff with the previous run of
its series, and the webhook that hears about them.

Each crossed threshold is one alert: the rule, where (target, hook point, SAE), the value, the
threshold and a sentence. The audit exits with :data:`EXIT_ALERT` when there is any. The webhook
URL is read from the environment variable ``alerts.webhook_env`` (a URL may carry a token, so it
is never in a spec, and it is never logged: log lines name its host only). The POST carries the
series, the two runs, the alerts and the report's address, nothing from the spec or the store's
options; it is retried a bounded number of times with backoff, and its failure is logged, not
raised: an audit that finished must not fail because a chat server is down.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

log = logging.getLogger("saeray")

EXIT_ALERT = 3
RETRIES = 4
TIMEOUT_S = 10.0


def _rise(rule: str, metric: str, sign: int, thr, t: dict, s: dict, out: list[dict], what: str) -> None:
    if thr is None:
        return
    m = s["metrics"][metric]
    if m["delta"] is not None and sign * m["delta"] > thr:
        out.append({"rule": rule, "target": t["b"], "hookpoint": s["hookpoint"], "sae": s["sae"],
                    "value": m["delta"], "threshold": thr,
                    "message": f"{t['b']} {s['hookpoint']} {s['sae']}: {what} {m['a']:.4g} -> {m['b']:.4g} "
                               f"({m['delta']:+.4g}, threshold {thr:g})"})


def check(diff: dict, alerts) -> list[dict]:
    """The alerts ``diff`` raises under the spec's ``alerts`` section (empty when none or no section)."""
    if alerts is None:
        return []
    out: list[dict] = []
    names = set(alerts.concepts_lost)
    for t in diff["targets"]:
        for s in t["saes"]:
            _rise("ce_loss_recovered_drop", "ce_loss_recovered", -1, alerts.ce_loss_recovered_drop, t, s, out,
                  "CE loss recovered fell")
            _rise("fvu_rise", "fvu", 1, alerts.fvu_rise, t, s, out, "FVU rose")
            _rise("kl_rise", "kl", 1, alerts.kl_rise, t, s, out, "KL rose")
            _rise("dead_fraction_rise", "dead_frac", 1, alerts.dead_fraction_rise, t, s, out, "dead fraction rose")
            f = s["features"]
            thr = alerts.matched_share_below
            if thr is not None and f.get("comparable") and f["matched_share"] < thr:
                out.append({"rule": "matched_share_below", "target": t["b"], "hookpoint": s["hookpoint"],
                            "sae": s["sae"], "value": f["matched_share"], "threshold": thr,
                            "message": f"{t['b']} {s['hookpoint']} {s['sae']}: {f['matched_share']:.1%} of features "
                                       f"matched in the previous run (threshold {thr:.0%}); {f['born']} born, "
                                       f"{f['lost']} lost"})
            inf, thr = s.get("influential"), alerts.influential_overlap_below
            if thr is not None and inf and inf["overlap"] < thr:
                out.append({"rule": "influential_overlap_below", "target": t["b"], "hookpoint": s["hookpoint"],
                            "sae": s["sae"], "value": inf["overlap"], "threshold": thr,
                            "message": f"{t['b']} {s['hookpoint']} {s['sae']}: {inf['overlap']:.0%} of the most "
                                       f"influential latents were among the previous run's (threshold {thr:.0%})"})
        for c in t["concepts"] or []:
            lost = [x for x in c["lost"] if "all" in names or x in names]
            if lost:
                out.append({"rule": "concepts_lost", "target": t["b"], "hookpoint": c["hookpoint"], "sae": c["by"],
                            "value": lost, "threshold": sorted(names),
                            "message": f"{t['b']} {c['hookpoint']}: {c['by']} lost {', '.join(lost)}"})
    return out


def host_of(url: str) -> str:
    """What a log line may say about a webhook: its scheme and host, never its path or query."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or '?'}{':' + str(p.port) if p.port else ''}"


def post(url: str, payload: dict, retries: int = RETRIES, timeout: float = TIMEOUT_S, backoff: float = 1.0) -> dict:
    """POST ``payload`` as JSON; retried on connection errors, 429 and 5xx, at most ``retries`` tries.
    Returns {"sent": bool, "status", "tries", "error"}."""
    if urlsplit(url).scheme not in ("http", "https"):
        return {"sent": False, "tries": 0, "error": "the webhook URL is not http(s)"}
    data = json.dumps(payload, default=str).encode()
    err, status = None, None
    for i in range(1, retries + 1):
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "saeray-alerts"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) checked above
                status = r.status
            return {"sent": True, "status": status, "tries": i}
        except urllib.error.HTTPError as e:
            status, err = e.code, f"HTTP {e.code}"
            if e.code != 429 and e.code < 500:
                break                                   # the receiver refuses this payload: retrying won't help
        except (urllib.error.URLError, OSError) as e:
            err = type(getattr(e, "reason", e)).__name__
        if i < retries:
            time.sleep(backoff * 2 ** (i - 1))
    log.warning(f"alert webhook {host_of(url)}: not delivered after {i} tries ({err})")
    return {"sent": False, "status": status, "tries": i, "error": err}


def payload(series: str, run: str, previous: str | None, alerts: list[dict], report: str | None) -> dict:
    return {"source": "saeray", "series": series, "run": run, "previous": previous, "n_alerts": len(alerts),
            "alerts": [{k: a[k] for k in ("rule", "target", "hookpoint", "sae", "value", "threshold", "message")}
                       for a in alerts], "report": report}

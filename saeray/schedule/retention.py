"""Retention: a nightly series keeps harvested activations for its newest runs only.

Activations are most of a run's bytes (every token of every hook point), and once a run's SAEs,
evaluations, sweeps and dashboards are finished nothing reads them. With ``series.keep_activations:
N``, the end of a successful run deletes the ``acts/`` folders of every finished run (status done
or alert) older than the newest N finished ones. SAEs, metrics, dashboards and reports stay.

Runs that are running or failed are never touched: a running run reads its activations, a failed
one will be resumed. Per target, the harvest's unit records are removed before the files (a crash
in between leaves files without records, which a re-harvest rewrites under the same names) and the
manifest's harvest section is marked ``pruned``, so resuming such a run later harvests again
instead of reading files that are gone. The run's index entry says ``activations: false``.
"""
from __future__ import annotations

import logging
import time

from ..manifest import Manifest
from ..run.records import Records
from .series import FINISHED, Series

log = logging.getLogger("saeray")


def prune_run(series: Series, run: str) -> int:
    """Delete the activations of one finished run; returns how many target folders held some."""
    st = series.run_store(run)
    m = Manifest.load(st)
    n = 0
    for tid, t in m.data.get("targets", {}).items():
        target = st / t["folder"]
        Records(target, "harvest").clear()
        if target.exists("acts"):
            target.rm("acts", recursive=True)
            n += 1
        if "harvest" in t.get("stages", {}):
            m.set_stage(tid, "harvest", pruned=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return n


def apply(series: Series, keep: int | None) -> list[str]:
    """Delete the activations of the finished runs older than the newest ``keep``; the runs pruned."""
    if keep is None:
        return []
    finished = [e for e in series.entries() if e.get("status") in FINISHED]
    old = finished[:-keep] if keep < len(finished) else []
    pruned = []
    for e in old:
        if e.get("activations") is False:
            continue
        n = prune_run(series, e["run"])
        series.put(e["run"], activations=False)
        log.info(f"retention: deleted the activations of run {e['run']} ({n} targets; keeping the newest {keep} runs')")
        pruned.append(e["run"])
    return pruned

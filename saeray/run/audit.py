"""``saeray audit``: every stage of the registry for every target of a spec, then the report.

Targets run side by side, one driver thread each (a thread only waits on Ray; the cluster's
resources decide how much really runs at once: a pool waits until its actors fit). Within a target
the stages run in order, each resumable (:mod:`saeray.run.stages`). Before anything starts, every
stage checks the whole spec against every target, so a spec that cannot finish fails before the
first forward pass. The same entrypoint runs on a laptop (a local Ray is started) and under
``ray job submit`` (it joins the job's cluster).

The driver holds the run folder's lease (:mod:`saeray.run.lease`) from before its first write to
its end, so a second process with the same run name is refused instead of writing alongside; a
lease lost mid-run stops the run at the next step. Ray actors write only under it.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import InputError
from ..manifest import Manifest
from ..raycluster import connect
from ..spec import AuditSpec
from ..schedule.series import Series
from ..store import Store
from .lease import Lease, LeaseLost
from .stages import TargetContext, check_all, run_stage, select
from .targets import Target, expand_targets

log = logging.getLogger("saeray")


@dataclass
class RunContext:
    spec: AuditSpec          # as written: ${ENV} placeholders kept; safe to serialise
    resolved: AuditSpec      # placeholders substituted; in memory only
    store: Store             # the run folder: <store>/<name>, or <store>/<spec.name>/runs/<name> in a series
    targets: list[Target]
    name: str = ""           # the run's name (spec.name, --run-name, or series.run_name rendered)
    series: Series | None = None
    date: str | None = None  # a series run's scheduled day
    manifest: Manifest | None = None   # opened once every check has passed: a bad spec writes nothing
    lease: Lease | None = None         # held while this process writes the run

    def check_lease(self) -> None:
        """Stop (LeaseLost) if another process took the run over; called between steps."""
        if self.lease is not None:
            self.lease.check()

    def target(self, t: Target) -> TargetContext:
        return TargetContext(self.resolved, self.spec, t, self.store, self.store / t.folder, self.manifest)


def open_run(spec: AuditSpec, store_url: str | None = None, revision: str | None = None,
             run_name: str | None = None, date: str | None = None) -> RunContext:
    """The run a spec names. With a ``series`` section, ``revisions: latest`` resolves now, and the
    run is named from the template with ``date`` (default today, UTC) and the resolved checkpoints."""
    from ..schedule.series import Series, check_date, check_run_name, run_name as render_name, today

    if store_url:
        spec = spec.with_store(store_url)
    resolved = spec.resolved()
    targets = expand_targets(resolved, revision)
    root = Store.from_spec(resolved.store)
    if run_name:
        check_run_name(run_name)
    if spec.series is None:
        if date:
            raise InputError("--date names a run of a series; this spec has no series section (add one, e.g. "
                             "series: {}, or leave --date out)")
        name = run_name or spec.name
        return RunContext(spec, resolved, root / name, targets, name)
    date = check_date(date) if date else today()
    name = run_name or render_name(spec.series.run_name, spec.name, date, targets)
    series = Series(root / spec.name, spec.name)
    return RunContext(spec, resolved, series.run_store(name), targets, name, series, date)


@contextmanager
def holding(rc: RunContext) -> Iterator[Lease]:
    """The run folder's lease for the block: acquired before the run's first write (a refused start
    writes nothing), released at the end, failure included. Re-entrant: an audit's run_targets runs
    under the audit's lease."""
    if rc.lease is not None:
        yield rc.lease
        return
    rc.store.check_writable()  # an unreachable or read-only store: a clear error (exit 2) before the lease
    st = rc.resolved.store
    rc.lease = Lease(rc.store, rc.name, st.lease_seconds, take_dead=st.lease_takeover).acquire()
    try:
        yield rc.lease
    finally:
        rc.lease.release()
        rc.lease = None


def run_targets(rc: RunContext, stages: list[str], address: str | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (and what they need) for every target; {target id: {stage: result}}."""
    chain = select(stages, rc.resolved)
    if rc.lease is None:  # a caller holding the lease (run_audit) checked the whole spec before taking it
        check_all(rc.resolved, rc.targets, chain)
    with holding(rc):
        return _run_targets(rc, chain, address)


def _run_targets(rc: RunContext, chain: list, address: str | None) -> dict[str, dict[str, Any]]:
    if rc.manifest is None:
        rc.manifest = Manifest.load_or_create(rc.store, rc.name, rc.spec.public_dict(), rc.spec.hash())
        if rc.series is not None:
            rc.manifest.data["series"] = {"name": rc.series.name, "date": rc.date}
    for t in rc.targets:
        rc.manifest.add_target(t)
    rc.manifest.save()
    connect(address)

    def one(t: Target) -> dict[str, Any]:
        ctx = rc.target(t)
        results: dict[str, Any] = {}
        for st in chain:
            rc.check_lease()
            results[st.name] = run_stage(ctx, st, {n: results[n] for n in st.needs_of(rc.resolved)})
        return results

    if len(rc.targets) == 1:
        return {rc.targets[0].id: one(rc.targets[0])}
    out, errors = {}, []
    with ThreadPoolExecutor(max_workers=len(rc.targets), thread_name_prefix="target") as ex:
        futures = {t.id: ex.submit(one, t) for t in rc.targets}
        for tid, f in futures.items():
            try:
                out[tid] = f.result()
            except BaseException as e:  # noqa: BLE001 - let the other targets finish, then report
                log.error(f"target {tid} failed: {e}")
                errors.append(e)
    if errors:
        raise errors[0]
    rc.check_lease()
    return out


def audit_stages(spec) -> list[str]:
    """The per-target stages an audit runs (with what they need): presence for emergence and, where
    the concepts are known (SAEs on a storyworld corpus with ``evaluation.concepts`` and
    ``evaluation.probes``), for the report's planted-concept recovery; dashboards when there are SAEs
    and they are not switched off."""
    concepts = (spec.sae is not None and spec.evaluation.concepts and spec.evaluation.probes
                and spec.corpus.source == "storyworld")
    return (["evaluate", "sweeps"] + (["presence"] if spec.emergence is not None or concepts else [])
            + (["dashboards"] if spec.sae is not None and spec.dashboards.enabled else []))


def run_audit(spec: AuditSpec, store_url: str | None = None, address: str | None = None,
              run_name: str | None = None, date: str | None = None) -> dict:
    """The whole audit; with a series, also its index entry, the diff with the previous run, the
    alerts and retention (:mod:`saeray.schedule.nightly`). The summary's ``alerts`` lists what tripped."""
    from ..report.build import report_stage
    from ..report.summary import build_summary
    from ..schedule import nightly

    rc = open_run(spec, store_url, run_name=run_name, date=date)
    t0 = time.perf_counter()
    # checks first, then the lease: a spec that cannot run, or a run another process holds, leaves no
    # index entry, manifest change or lease behind
    check_all(rc.resolved, rc.targets, select(audit_stages(rc.resolved), rc.resolved))
    with holding(rc):
        if rc.series is not None:
            nightly.begin(rc)
        try:
            run_targets(rc, audit_stages(rc.resolved), address)
            if rc.resolved.emergence is not None:
                from ..emergence.analysis import emergence_stage

                rc.check_lease()
                emergence_stage(rc)
            rc.check_lease()
            alerts = nightly.diff_stage(rc) if rc.series is not None else []
            t1 = time.perf_counter()
            rc.manifest.set_stage(None, "report", status="running")
            out = report_stage(rc)
            rc.manifest.set_stage(None, "report", status="done", wall_s=round(time.perf_counter() - t1, 2), **out)
            rc.check_lease()
        except BaseException as e:
            if rc.series is not None and not isinstance(e, LeaseLost):  # the index entry is the new holder's now
                nightly.failed(rc, e)
            raise
        summary = build_summary(rc.manifest.data, rc.store.url)
        summary["total_wall_s"] = round(time.perf_counter() - t0, 2)
        rc.store.write_json("report/summary.json", summary)
        summary["report"] = rc.store.url_of("report/index.html")
        summary["summary"] = rc.store.url_of("report/summary.json")
        for tid, st in summary["stage_wall_s"].items():
            log.info(f"{tid}: {st}")
        if rc.series is not None:
            summary.update(nightly.finish(rc, alerts, summary["report"]))
        return summary

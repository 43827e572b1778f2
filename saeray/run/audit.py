"""``saeray audit``: every stage of the registry for every target of a spec, then the report.

Targets run side by side, one driver thread each (a thread only waits on Ray; the cluster's
resources decide how much really runs at once: a pool waits until its actors fit). Within a target
the stages run in order, each resumable (:mod:`saeray.run.stages`). Before anything starts, every
stage checks the whole spec against every target, so a spec that cannot finish fails before the
first forward pass. The same entrypoint runs on a laptop (a local Ray is started) and under
``ray job submit`` (it joins the job's cluster).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..manifest import Manifest
from ..raycluster import connect
from ..spec import AuditSpec
from ..schedule.series import Series
from ..store import Store
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


def run_targets(rc: RunContext, stages: list[str], address: str | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (and what they need) for every target; {target id: {stage: result}}."""
    chain = select(stages, rc.resolved)
    check_all(rc.resolved, rc.targets, chain)
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
    if rc.series is not None:
        # checks first: a spec that cannot run leaves no index entry behind
        check_all(rc.resolved, rc.targets, select(audit_stages(rc.resolved), rc.resolved))
        nightly.begin(rc)
    try:
        run_targets(rc, audit_stages(rc.resolved), address)
        if rc.resolved.emergence is not None:
            from ..emergence.analysis import emergence_stage

            emergence_stage(rc)
        alerts = nightly.diff_stage(rc) if rc.series is not None else []
        t1 = time.perf_counter()
        rc.manifest.set_stage(None, "report", status="running")
        out = report_stage(rc)
        rc.manifest.set_stage(None, "report", status="done", wall_s=round(time.perf_counter() - t1, 2), **out)
    except BaseException as e:
        if rc.series is not None:
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

"""Runs of a scheduled series: their names and the series index.

A spec with a ``series`` section is run once per night (or per new checkpoint). Each run gets its
own folder, ``<store>/<spec name>/runs/<run name>``, the name rendered from ``series.run_name``
with the run's date and its targets' resolved checkpoints, so a retried submission of the same
night resumes that night's run and the next night starts a new one.

The index lives beside the runs: one small entry per run, ``<series>/index/<run>.json``, written
by that run alone (two runs never rewrite each other's entry), and ``<series>/index.json``, the
entries in the order the runs started, rebuilt from them after every change, so a lost update of
the combined file heals on the next one. An entry holds what a reader asks first: which
checkpoints, when, the status (running, done, alert, failed), the alerts, where the run and its
report are, and whether it still holds activations.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import InputError
from ..store import Store

INDEX = "index.json"
ENTRIES = "index"
RUNS = "runs"
FINISHED = ("done", "alert")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def check_date(date: str) -> str:
    try:
        datetime.strptime(date, "%Y-%m-%d")
    except ValueError:
        raise InputError(f"--date: '{date}' is not a date; give YYYY-MM-DD (the scheduled day, e.g. 2026-12-03)") from None
    return date


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", s)


def run_name(template: str, name: str, date: str, targets) -> str:
    """``template`` with the run's fields; revisions and models of several targets joined by '+'."""
    revs = "+".join(dict.fromkeys(_safe(t.revision) for t in targets))
    models = "+".join(dict.fromkeys(t.slug for t in targets))
    out = template.format(name=name, date=date, revision=revs, model=models)
    if len(out) > 120:
        raise InputError(f"series.run_name: '{out[:60]}...' is {len(out)} characters; shorten the template (e.g. "
                         "drop {model} or {revision} when the spec audits many targets)")
    return out


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}", name):
        raise InputError(f"--run-name: '{name}' may hold only letters, digits, '.', '_' and '-' (starting with a "
                         "letter or digit), at most 120 characters")
    return name


@dataclass
class Series:
    """The folder of one series, ``<store>/<spec name>``."""

    store: Store
    name: str

    @classmethod
    def of_run(cls, run: Store, manifest: dict) -> "Series | None":
        """The series a run folder belongs to (from its manifest), or None for a run on its own."""
        s = manifest.get("series")
        if not s:
            return None
        parent = run.url.rstrip("/").rsplit("/", 2)
        if len(parent) != 3 or parent[1] != RUNS:
            raise InputError(f"{run.url}: its manifest says it is run '{manifest.get('run')}' of series "
                             f"'{s['name']}', but it is not in a '{RUNS}/' folder of that series; was it moved?")
        return cls(Store(parent[0], run.options), s["name"])

    def run_store(self, run: str) -> Store:
        return self.store / RUNS / run

    # -- the index ------------------------------------------------------------------------------
    def entry(self, run: str) -> dict | None:
        rel = f"{ENTRIES}/{run}.json"
        return self.store.read_json(rel) if self.store.exists(rel) else None

    def put(self, run: str, **fields) -> dict:
        """Create or update the entry of ``run``, then rebuild index.json."""
        e = self.entry(run) or {"run": run, "folder": f"{RUNS}/{run}", "started": _now()}
        e.update(fields, updated=_now())
        self.store.write_json(f"{ENTRIES}/{run}.json", e)
        self.rebuild()
        return e

    def entries(self) -> list[dict]:
        """Every run's entry, in the order the runs started."""
        out = [self.store.read_json(f"{ENTRIES}/{f}") for f in self.store.ls(ENTRIES) if f.endswith(".json")]
        return sorted(out, key=lambda e: (e.get("started", ""), e["run"]))

    def rebuild(self) -> dict:
        idx = {"series": self.name, "updated": _now(), "runs": self.entries()}
        self.store.write_json(INDEX, idx)
        return idx

    def previous(self, run: str) -> dict | None:
        """The newest finished run that started before ``run`` (what ``run`` is compared with)."""
        es = self.entries()
        names = [e["run"] for e in es]
        before = es[:names.index(run)] if run in names else es
        done = [e for e in before if e.get("status") in FINISHED]
        return done[-1] if done else None


def open_series(url: str) -> Series:
    """A series folder given by URL (``<store>/<name>``), refused when it holds no index."""
    st = Store.open(url)
    if not st.exists(INDEX) and not st.exists(ENTRIES):
        raise InputError(f"{url}: no {INDEX}, so this is not a saeray series folder; give <store>/<spec name> of a "
                         "spec with a series section that has run at least once")
    idx = st.read_json(INDEX) if st.exists(INDEX) else {}
    return Series(st, idx.get("series") or url.rstrip("/").rsplit("/", 1)[-1])

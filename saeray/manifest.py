"""The run manifest (``<run>/manifest.json``): what a run is (its spec and targets) and which
stages of which target have finished, with their typed results.

It is small and rewritten only when a stage starts or ends: the per-unit bookkeeping inside a
stage (harvest work units, training hook points) goes to :mod:`saeray.run.records`, one small
object per unit, so recording unit 3 000 costs what recording unit 3 does. Data files are written
first, their records after; a file that exists without a record does not count and is rewritten
on resume, so a crash can neither lose nor duplicate data. Several targets run side by side in one
driver, so updates are serialised by a lock.

Layout::

    {
      "run": "storyworld-default", "saeray_version": "0.1.0", "created": ..., "updated": ...,
      "spec": {...normalised spec, ${ENV} placeholders kept...}, "spec_hash": "...",
      "targets": {
        "storyworld-4l@main": {"model": "storyworld-4l", "revision": "main",
                               "folder": "targets/storyworld-4l@main",
                               "stages": {"harvest": {"status": "done", "wall_s": 12.3, "key": {...},
                                                      "result": {...}}, "train": {...}, ...}}},
      "stages": {"report": {"status": "done", "wall_s": 0.4, ...}}
    }
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any

from . import __version__
from .errors import InputError
from .store import Store

FILE = "manifest.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    def __init__(self, store: Store, data: dict[str, Any]):
        self.store = store
        self.data = data
        self._lock = threading.RLock()

    @classmethod
    def load_or_create(cls, store: Store, run: str, spec: dict, spec_hash: str) -> "Manifest":
        if store.exists(FILE):
            data = store.read_json(FILE)
            if data.get("run") != run:
                raise InputError(f"{store.url_of(FILE)} belongs to run '{data.get('run')}', not '{run}'; use another store or run name")
            if "targets" not in data:
                raise InputError(f"{store.url_of(FILE)} was written by an older saeray (no per-target sections); "
                                 "use a new run name or delete the run folder")
            data["spec"], data["spec_hash"] = spec, spec_hash
            return cls(store, data)
        m = cls(store, {"run": run, "saeray_version": __version__, "created": _now(), "updated": _now(),
                        "spec": spec, "spec_hash": spec_hash, "targets": {}, "stages": {}})
        m.save()
        return m

    @classmethod
    def load(cls, store: Store) -> "Manifest":
        if not store.exists(FILE):
            raise InputError(f"no run at {store.url}: {FILE} is missing; run `saeray audit` or `saeray harvest` first")
        return cls(store, store.read_json(FILE))

    def save(self) -> None:
        with self._lock:
            self.data["updated"] = _now()
            snapshot = copy.deepcopy(self.data)
        self.store.write_json(FILE, snapshot)

    # -- targets --------------------------------------------------------------------------------
    def add_target(self, target) -> None:
        with self._lock:
            t = self.data["targets"].setdefault(target.id, {"stages": {}})
            t.update(model=target.model, revision=target.revision, folder=target.folder)

    def stage(self, target_id: str | None, name: str) -> dict:
        """The record of stage ``name`` of a target (``None``: a run-level stage such as report)."""
        with self._lock:
            stages = self.data["stages"] if target_id is None else self.data["targets"][target_id]["stages"]
            return stages.setdefault(name, {"status": "pending"})

    def set_stage(self, target_id: str | None, name: str, **fields: Any) -> None:
        with self._lock:
            self.stage(target_id, name).update(fields)
        self.save()

    def result(self, target_id: str, name: str) -> dict | None:
        """A finished stage's recorded result, or None."""
        return stage_result(self.data.get("targets", {}).get(target_id, {}), name)


def stage_result(target: dict, name: str) -> dict | None:
    """The recorded result of stage ``name`` in one target's manifest section, if it finished."""
    rec = target.get("stages", {}).get(name, {})
    return rec.get("result") if rec.get("status") == "done" else None

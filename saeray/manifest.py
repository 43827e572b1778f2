"""The run manifest (``<run>/manifest.json``): the single record of what a run has finished.

Data files are written first (atomically, see :mod:`saeray.store`), then recorded here; a file that
exists but is not recorded does not count and is rewritten on resume, so a crash can neither lose
nor duplicate data. One process (the driver) writes the manifest; each save rewrites it atomically.

Layout::

    {
      "run": "storyworld-default", "saeray_version": "0.1.0", "created": ..., "updated": ...,
      "spec": {...normalised spec, ${ENV} placeholders kept...}, "spec_hash": "...",
      "stages": {"harvest": {"status": "done", "wall_s": 12.3, ...}, "train": {...}, ...},
      "harvest": {"hash": ..., "model": ..., "revision": ..., "hookpoints": [...],
                   "units": {"00000": {"rows": 32512, "files": {"resid_post.0": {"path": ..., "rows": ..., "bytes": ..., "sha256": ...}}}},
                   "totals": {"units": ..., "rows": ..., "bytes": ...}}
    }
"""
from __future__ import annotations

import time
from typing import Any

from . import __version__
from .errors import InputError
from .store import Store

FILE = "manifest.json"


class Manifest:
    def __init__(self, store: Store, data: dict[str, Any]):
        self.store = store
        self.data = data

    @classmethod
    def load_or_create(cls, store: Store, run: str, spec: dict, spec_hash: str) -> "Manifest":
        if store.exists(FILE):
            data = store.read_json(FILE)
            if data.get("run") != run:
                raise InputError(f"{store.url_of(FILE)} belongs to run '{data.get('run')}', not '{run}'; use another store or run name")
            data["spec"], data["spec_hash"] = spec, spec_hash
            return cls(store, data)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        m = cls(store, {"run": run, "saeray_version": __version__, "created": now, "updated": now,
                        "spec": spec, "spec_hash": spec_hash, "stages": {}})
        m.save()
        return m

    @classmethod
    def load(cls, store: Store) -> "Manifest":
        if not store.exists(FILE):
            raise InputError(f"no run at {store.url}: {FILE} is missing; run `saeray audit` or `saeray harvest` first")
        return cls(store, store.read_json(FILE))

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.store.write_json(FILE, self.data)

    # -- stages ---------------------------------------------------------------------------------
    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def stage_done(self, name: str) -> bool:
        return self.data["stages"].get(name, {}).get("status") == "done"

    def set_stage(self, name: str, **fields: Any) -> None:
        self.stage(name).update(fields)
        self.save()

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})

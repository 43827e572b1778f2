"""Per-unit records of a stage's finished work: one small JSON object per unit, written once.

Rewriting one document that lists every finished unit after each unit costs bytes quadratic in
the number of units (unit 3 000 rewrites 2 999 records); here recording a unit is one atomic write
of its own record, whatever the count. When a stage ends, :meth:`Records.consolidate` folds the
per-unit objects into one file so that later reads are one GET instead of one per unit.

Layout under the store: ``_records/<stage>/<unit>.json`` (per unit) and ``_records/<stage>.json``
(consolidated, ``{unit: record}``). Readers merge both, so a crash between consolidate's write and
its deletes loses nothing and duplicates nothing. A unit is recorded once: a per-unit file whose
unit the consolidated file already holds is a crash leftover with the same content and is not read.
"""
from __future__ import annotations

import re

from ..store import Store
from .lease import check_for

DIR = "_records"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@=-]*$")  # one path component, never hidden


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"records: {kind} name {name!r} must be one path component of letters, digits, "
                         "'_', '.', '@', '=' or '-', not starting with '.' or '-'")
    return name


class Records:
    """Finished work units of one stage, one small JSON object per unit, written once."""

    def __init__(self, store: Store, stage: str):
        self.store = store
        self.stage = _check_name("stage", stage)
        self.consolidated = f"{DIR}/{stage}.json"
        self.folder = f"{DIR}/{stage}"

    def _unit_file(self, unit: str) -> str:
        return f"{self.folder}/{unit}.json"

    def put(self, unit: str, record: dict) -> None:
        """Record ``unit`` as finished: one atomic write of one small object."""
        check_for(self.store)  # a driver that lost its run's lease stops before recording more work
        self.store.write_json(self._unit_file(_check_name("unit", unit)), record)

    # -- reading --------------------------------------------------------------------------------
    def _read_consolidated(self) -> dict[str, dict]:
        try:
            return self.store.read_json(self.consolidated)
        except FileNotFoundError:
            return {}

    def _listed(self) -> list[str]:
        """Units with a per-unit file (Store.ls already hides temporaries of unfinished writes)."""
        return [n[:-5] for n in self.store.ls(self.folder) if n.endswith(".json")]

    def names(self) -> set[str]:
        """The recorded units (a listing; no record is read)."""
        return set(self._read_consolidated()) | set(self._listed())

    def load(self) -> dict[str, dict]:
        """unit -> record for every recorded unit, sorted by unit name."""
        return self._load()[0]

    def _load(self) -> tuple[dict[str, dict], set[str], list[str]]:
        """(records, units the consolidated file held, units that have a per-unit file)."""
        out = self._read_consolidated()
        held = set(out)
        listed = self._listed()
        for unit in listed:
            if unit in out:
                continue
            try:
                out[unit] = self.store.read_json(self._unit_file(unit))
            except FileNotFoundError:
                # a concurrent consolidate folded it in and deleted it after we read the
                # consolidated file; its new consolidated file has it
                out.update({u: r for u, r in self._read_consolidated().items() if u not in out})
        return dict(sorted(out.items())), held, listed

    # -- maintenance ----------------------------------------------------------------------------
    def consolidate(self) -> dict[str, dict]:
        """Fold the per-unit files into ``_records/<stage>.json`` (one write), then delete them.

        Written before anything is deleted; a crash in between leaves per-unit files that the
        consolidated file also holds, which readers merge and the next consolidate deletes."""
        records, held, listed = self._load()
        if not set(listed) <= held:
            self.store.write_json(self.consolidated, records)
        if listed:
            self.store.fs.rm([self.store.path(self._unit_file(u)) for u in listed])
        return records

    def clear(self) -> None:
        """Forget every record of this stage (consolidated and per unit)."""
        self.store.rm(self.folder, recursive=True)
        self.store.rm(self.consolidated)

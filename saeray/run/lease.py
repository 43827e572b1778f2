"""A run's lease on its folder, so that two processes never write one run at the same time.

The lease lives in the run folder itself (no other service needed), as numbered *generations*
``<run>/_lease/<gen:08d>.json``; the highest number is the current lease. Each holds the owner
(host, pid, a random token), when it was acquired and last renewed, and when it expires (wall clock,
UTC). Safe under races because a generation is only ever *created exclusively*: on S3 a PutObject
with ``If-None-Match: *`` (the second creator gets 412), on a local folder a hard link of a fully
written temporary to the final name (``link`` fails if the name exists). Two processes that both
find the lease free race to create the same next generation, and exactly one succeeds.

* **acquire**: the newest generation unexpired and not released -> :class:`LeaseHeld` (exit 4),
  naming the holder, unless that holder is provably dead on this machine (:func:`holder_gone`).
  Otherwise create the next generation; losing that race -> :class:`LeaseHeld`.
* **renew** (a heartbeat thread, every ttl/4): first check that no newer generation exists and
  ours still carries our token, then rewrite ours with a new expiry. A newer generation means we
  were presumed dead and someone took over; a renewal that cannot reach the store before our own
  expiry means someone may. Either way the lease is *lost*: :meth:`Lease.check`, which the driver
  calls between steps, raises :class:`LeaseLost` instead of letting the run keep writing.
* **release**: rewrite ours as released (expired now). The newest generation is never deleted, so
  generation numbers only grow and a stale holder can never mistake a new lease for its own; older
  generations are deleted by whoever creates a newer one.

Clocks: expiry is compared with this machine's wall clock (:func:`now`, the one place time is read),
so hosts sharing a store need clocks within a small fraction of ``store.lease_seconds``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import SaerayError
from ..store import Store

log = logging.getLogger("saeray")

FOLDER = "_lease"
_GEN = re.compile(r"^(\d{8})\.json$")


class LeaseHeld(SaerayError):
    """Another process holds this run's lease (exit code 4)."""

    exit_code = 4


class LeaseLost(SaerayError):
    """This process lost its lease while running (a runtime failure: exit code 1)."""


_HELD: dict[str, "Lease"] = {}  # run folder URL -> the lease this process holds on it
_MINE: set[str] = set()          # tokens of the leases this process is acquiring or holds


def check_for(store: Store) -> None:
    """Raise :class:`LeaseLost` if ``store`` lies in a run whose lease this process held and lost. A
    no-op elsewhere (Ray workers hold no lease), so a writer anywhere can call it before writing."""
    for url, lease in list(_HELD.items()):
        if store.url == url or store.url.startswith(url + "/"):
            lease.check()


def now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _epoch(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _name(gen: int) -> str:
    return f"{FOLDER}/{gen:08d}.json"


def generations(run: Store) -> list[int]:
    """The lease generations present in a run folder, oldest first."""
    return sorted(int(m.group(1)) for n in run.ls(FOLDER) if (m := _GEN.match(n)))


def current(run: Store) -> tuple[int, dict | None]:
    """The newest generation and its record; (0, None) when the run has no lease yet."""
    for _ in range(5):  # a generation can be collected between listing and reading: list again
        gens = generations(run)
        if not gens:
            return 0, None
        try:
            return gens[-1], json.loads(run.read_bytes(_name(gens[-1])))
        except FileNotFoundError:
            continue
        except ValueError:  # only a hand-edited object can be unreadable: never let it lock a run forever
            log.warning(f"{run.url_of(_name(gens[-1]))} is not a lease record; treated as expired")
            return gens[-1], {"released": True}
    raise SaerayError(f"{run.url_of(FOLDER)}: the lease generations keep changing while being read; retry")


def _active(rec: dict | None, t: float) -> bool:
    return bool(rec) and not rec.get("released") and _epoch(rec["expires"]) > t


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> dict:
    """What makes a pid mean one process: the host name, this boot of the kernel and the pid
    namespace (containers sharing a host name, e.g. with host networking, have their own)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone (or not ours to see): None
        return None


def _owner() -> dict:
    return {**_machine(), "pid": os.getpid(), "started": _started(os.getpid()), "token": uuid.uuid4().hex}


def holder_gone(rec: dict | None) -> bool:
    """True only when the holder is provably dead: it ran on this machine, in this boot and pid
    namespace, and no process with its pid and start time exists. A crashed run on this machine is
    then taken over at once; a holder elsewhere (or one we cannot identify) keeps its lease until it
    expires."""
    o = (rec or {}).get("owner") or {}
    m = _machine()
    if not (m["boot"] and m["pidns"]) or any(o.get(k) != m[k] for k in ("host", "boot", "pidns")):
        return False
    if not isinstance(o.get("pid"), int) or o.get("started") is None:
        return False
    if o["pid"] == os.getpid():
        # ours, but no live Lease of this process has its token: a run in this process ended
        # without releasing it (the store was down at the end)
        return o.get("token") not in _MINE
    started = _started(o["pid"])
    return started is None or abs(started - o["started"]) > 1.0


def create_exclusive(store: Store, rel: str, data: bytes) -> None:
    """Write ``rel`` only if nothing is there; FileExistsError otherwise (atomically, no overwrite)."""
    if not store.is_local:
        store.fs.pipe_file(store.path(rel), data, mode="create")  # PutObject If-None-Match: *
        return
    final = store.path(rel)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = store._tmp_for(rel)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, final)  # fails with FileExistsError if the name exists: the whole record or nothing
    finally:
        os.unlink(tmp)


def _held_message(run: Store, rec: dict, t: float) -> str:
    o = rec.get("owner", {})
    renewed, expires = _epoch(rec["renewed"]), _epoch(rec["expires"])
    return (f"run folder {run.url} is in use by another saeray process (host {o.get('host')}, pid {o.get('pid')}), "
            f"which last renewed its lease at {rec['renewed']} ({t - renewed:.0f} s ago); the lease expires at "
            f"{rec['expires']} (in {max(0.0, expires - t):.0f} s) unless renewed. Wait for that run to finish, or "
            f"use another run name (the spec's 'name' or --run-name). If that process crashed, its lease expires "
            f"{rec.get('ttl_s', '?')} s after its last renewal (store.lease_seconds) and a new run then resumes it.")


def of_manifest(run: Store, manifest: dict) -> "Lease":
    """The lease for a command that writes into a finished run (``saeray report``, ``diff --save``),
    with the settings the run was started with."""
    from ..spec import StoreSpec

    st = StoreSpec.model_validate({"url": run.url, **((manifest.get("spec") or {}).get("store") or {})})
    return Lease(run, manifest.get("run") or run.url.rsplit("/", 1)[-1], st.lease_seconds,
                 take_dead=st.lease_takeover)


@dataclass
class Lease:
    """``with Lease(run_store, "run-name", ttl).acquire() as lease: ... lease.check() ...``"""

    run: Store
    name: str
    ttl: float
    owner: dict = field(default_factory=_owner)
    take_dead: bool = True   # take over at once a lease whose holder is provably dead (holder_gone)
    gen: int = 0
    acquired: float = 0.0
    expires: float = 0.0
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _record(self, t: float, released: bool = False) -> bytes:
        return json.dumps({"run": self.name, "folder": self.run.url, "generation": self.gen, "owner": self.owner,
                           "acquired": _iso(self.acquired), "renewed": _iso(t),
                           "expires": _iso(t if released else t + self.ttl), "ttl_s": self.ttl,
                           "released": released}, indent=1).encode()

    def acquire(self) -> "Lease":
        t = now()
        gen, rec = current(self.run)
        if _active(rec, t):
            if not (self.take_dead and holder_gone(rec)):
                raise LeaseHeld(_held_message(self.run, rec, t))
            o = rec.get("owner", {})
            log.warning(f"run folder {self.run.url}: its lease holder (pid {o.get('pid')} on this machine) is gone; "
                        "taking the run over")
        self.gen, self.acquired = gen + 1, t
        _MINE.add(self.owner["token"])
        try:
            create_exclusive(self.run, _name(self.gen), self._record(t))
        except FileExistsError:  # taken between our read and our create, unless a retried request of ours made it
            gen, rec = current(self.run)
            if gen == self.gen and (rec or {}).get("owner", {}).get("token") == self.owner["token"]:
                return self._start(t)
            _MINE.discard(self.owner["token"])
            raise LeaseHeld(_held_message(self.run, rec, now()) if _active(rec, now()) else
                            f"run folder {self.run.url}: another saeray process acquired its lease at the same "
                            "moment; wait for it to finish, or use another run name") from None
        except BaseException:
            _MINE.discard(self.owner["token"])
            raise
        return self._start(t)

    def _start(self, t: float) -> "Lease":
        self.expires = t + self.ttl
        log.info(f"lease on {self.run.url} acquired (generation {self.gen}, expires in {self.ttl:g} s unless renewed)")
        for old in generations(self.run):
            if old < self.gen:
                try:
                    self.run.rm(_name(old))
                except OSError:  # best effort: an old generation left behind is harmless
                    pass
        self._thread = threading.Thread(target=self._heartbeat, name="saeray-lease", daemon=True)
        self._thread.start()
        _HELD[self.run.url] = self
        return self

    def renew(self) -> None:
        """Extend our lease, or mark it lost if someone took over."""
        gen, rec = current(self.run)
        if gen != self.gen or (rec or {}).get("owner", {}).get("token") != self.owner["token"]:
            holder = (rec or {}).get("owner", {})
            self._lose(f"run folder {self.run.url}: this process's lease (generation {self.gen}) was taken over by "
                       f"host {holder.get('host')}, pid {holder.get('pid')} (generation {gen}) after it could not be "
                       "renewed in time; stopping so that two processes never write one run. Make sure only one "
                       "process runs it, then re-run to resume")
            return
        t = now()
        self.run.write_bytes(_name(self.gen), self._record(t))
        self.expires = t + self.ttl

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a store hiccup: retry next beat until our own expiry
                log.warning(f"lease on {self.run.url}: renewal failed ({type(e).__name__}: {e}); retrying")
            if self.lost is None and now() >= self.expires:
                self._lose(f"run folder {self.run.url}: this process's lease could not be renewed before it "
                           f"expired ({self.ttl:g} s, store.lease_seconds); another process may now hold the run, "
                           "so this one stops. Check the store is reachable, then re-run to resume")
            if self.lost is not None:
                return

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error(why)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if this process no longer holds the run (call between steps)."""
        if self.lost is None and now() >= self.expires:  # the heartbeat itself may be stuck
            self._lose(f"run folder {self.run.url}: this process's lease expired without being renewed")
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop renewing and mark the lease released, if we still hold it (best effort)."""
        self._stop.set()
        _MINE.discard(self.owner["token"])
        if _HELD.get(self.run.url) is self:
            del _HELD[self.run.url]
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None or not self.gen:
            return
        try:
            gen, rec = current(self.run)
            if gen == self.gen and (rec or {}).get("owner", {}).get("token") == self.owner["token"]:
                self.run.write_bytes(_name(self.gen), self._record(now(), released=True))
                log.info(f"lease on {self.run.url} released")
        except Exception as e:  # noqa: BLE001 - the lease then simply expires after ttl
            log.warning(f"lease on {self.run.url}: could not release ({type(e).__name__}: {e}); it expires in "
                        f"{max(0.0, self.expires - now()):.0f} s")

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""A run's lease on its folder (saeray.run.lease), on a local folder and on S3 (moto server):
a second holder is refused while the lease is renewed, an expired lease is taken over, a holder
that was taken over notices and stops, exactly one of several racers wins; integrated, a held run
refuses `run_targets` / `saeray audit` before anything is written (exit 4), and after the holder is
SIGKILLed and its lease expires, a new audit resumes it to exact results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from saeray.errors import SaerayError
from saeray.run import lease as L
from saeray.run.lease import Lease, LeaseHeld, LeaseLost, create_exclusive, current, generations
from saeray.store import Store

both = pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)


def _frozen(lease: Lease) -> Lease:
    """Stop a holder's heartbeat as if its process were paused (or its renewals never arrived)."""
    lease._stop.set()
    lease._thread.join()
    return lease


def _expired_record(run: Store, gen: int) -> None:
    t = L.now() - 60
    rec = {"run": "r", "generation": gen, "owner": {"host": "gone", "pid": 1, "token": "dead"},
           "acquired": L._iso(t), "renewed": L._iso(t), "expires": L._iso(t + 1), "ttl_s": 1, "released": False}
    create_exclusive(run, L._name(gen), json.dumps(rec).encode())


@both
def test_acquire_refuse_release_reacquire(store_url):
    run = Store.open(store_url) / "r1"
    a = Lease(run, "r1", ttl=30).acquire()
    assert generations(run) == [1] and a.gen == 1
    with pytest.raises(LeaseHeld) as e:
        Lease(Store.open(store_url) / "r1", "r1", ttl=30).acquire()
    assert e.value.exit_code == 4 and isinstance(e.value, SaerayError)
    msg = str(e.value)
    assert run.url in msg and f"pid {os.getpid()}" in msg and a.owner["host"] in msg
    assert "another run name" in msg and "store.lease_seconds" in msg and "expires at" in msg
    assert generations(run) == [1]          # the refused one wrote nothing
    a.check()
    a.release()
    assert current(run)[1]["released"] is True
    b = Lease(run, "r1", ttl=30).acquire()  # released: free at once, the next generation
    assert b.gen == 2 and generations(run) == [2]   # the old generation collected
    b.release()


@both
def test_heartbeat_renews_and_expired_lease_is_taken_over(store_url):
    run = Store.open(store_url) / "r2"
    a = Lease(run, "r2", ttl=3).acquire()
    first = a.expires
    time.sleep(4.5)                          # longer than the TTL: only the heartbeat keeps it
    assert a.expires > first
    with pytest.raises(LeaseHeld):
        Lease(run, "r2", ttl=3).acquire()
    a.check()
    _frozen(a)                               # A stops renewing (paused, or cut off from the store)
    time.sleep(max(0.0, a.expires - L.now()) + 0.2)
    b = Lease(run, "r2", ttl=30).acquire()   # expired: taken over
    assert b.gen == a.gen + 1
    with pytest.raises(LeaseLost, match="expired"):
        a.check()                            # A notices by itself: its own expiry passed
    a.renew()                                # and its next renewal sees the newer generation
    with pytest.raises(LeaseLost, match=f"taken over by host .*pid {os.getpid()} \\(generation {b.gen}\\)"):
        a.check()
    a.release()                              # a lost lease releases nothing: B's record untouched
    gen, rec = current(run)
    assert gen == b.gen and rec["owner"]["token"] == b.owner["token"] and not rec["released"]
    b.check()
    b.release()


@both
def test_heartbeat_detects_a_takeover_and_check_for_stops_writers(store_url):
    run = Store.open(store_url) / "r3"
    a = Lease(run, "r3", ttl=4).acquire()
    L.check_for(run / "targets" / "x")      # held: writers below the run may go on
    # another process took the run over (it judged A dead: a pause, a clock far off)
    t = L.now()
    rec = {"run": "r3", "generation": a.gen + 1, "owner": {"host": "other", "pid": 99, "token": "t"},
           "acquired": L._iso(t), "renewed": L._iso(t), "expires": L._iso(t + 60), "ttl_s": 60, "released": False}
    create_exclusive(run, L._name(a.gen + 1), json.dumps(rec).encode())
    deadline = time.monotonic() + 10
    while a.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.lost is not None, "the heartbeat must notice the newer generation within a few beats"
    with pytest.raises(LeaseLost, match="host other, pid 99"):
        a.check()
    with pytest.raises(LeaseLost):
        L.check_for(run / "targets" / "x" / "_records")
    L.check_for(Store.open(store_url) / "r3-other")   # another run: not affected
    a.release()
    assert current(run)[1]["owner"]["host"] == "other"
    assert not L._HELD


@pytest.mark.parametrize("store_url", ["local", "s3"], indirect=True)
def test_racing_for_an_expired_lease_exactly_one_wins(store_url):
    rounds, racers = 20, 3
    for r in range(rounds):
        stores = [Store.open(store_url) / f"race{r}" for _ in range(racers)]  # one client each, as in separate processes
        _expired_record(stores[0], 1)
        barrier = threading.Barrier(racers)
        won, refused = [], []

        def race(st: Store) -> None:
            barrier.wait()
            try:
                won.append(Lease(st, "race", ttl=30).acquire())
            except LeaseHeld as e:
                refused.append(str(e))

        threads = [threading.Thread(target=race, args=(st,)) for st in stores]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert len(won) == 1 and len(refused) == racers - 1, (r, len(won), refused)
        assert won[0].gen == 2 and current(stores[0])[1]["owner"]["token"] == won[0].owner["token"]
        won[0].release()


def test_racing_processes_exactly_one_wins(tmp_path):
    """The same race between separate processes on a local folder (os.link across processes)."""
    run = Store.open(str(tmp_path)) / "rp"
    _expired_record(run, 1)
    go, done = tmp_path / "go", tmp_path / "done"
    # the winner holds its lease until every racer has answered: a winner that had already exited
    # would be a dead holder, which a late racer rightly takes over (holder_gone)
    code = ("import os,sys,time\nfrom saeray.store import Store\nfrom saeray.run.lease import Lease, LeaseHeld\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
            f"try:\n    Lease(Store.open({str(tmp_path)!r}) / 'rp', 'rp', ttl=30).acquire(); print('won', flush=True)\n"
            "except LeaseHeld: print('refused', flush=True); sys.exit(0)\n"
            f"t = time.time()\nwhile not os.path.exists({str(done)!r}) and time.time() - t < 60: time.sleep(0.01)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(3)                            # all four importing done and polling
    go.touch()
    deadline = time.time() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.05)
    done.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["refused"] * 3 + ["won"]
    assert generations(run) == [2]


def test_held_run_refuses_run_targets_before_writing(tiny_model, tmp_path):
    """run_targets takes the lease after the checks and before the manifest: refused -> nothing."""
    from saeray.run.audit import open_run, run_targets
    from saeray.spec import parse_spec

    spec = parse_spec(json.dumps(_spec(tiny_model, str(tmp_path / "store"))))
    rc = open_run(spec)
    holder = Lease(rc.store, rc.name, ttl=60).acquire()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    with pytest.raises(LeaseHeld, match=r"is in use by another saeray process"):
        run_targets(open_run(spec), ["harvest"])
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert not (tmp_path / "store" / "lz" / "manifest.json").exists()
    holder.release()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    """A holder SIGKILLed on this machine (same host, boot and pid namespace; its pid gone) does not
    lock the run until expiry: the next process takes over at once, unless told to wait
    (take_dead=False, store.lease_takeover: false). A live holder, or one on another machine or in
    another pid namespace, is never taken over before expiry."""
    run = Store.open(str(tmp_path / "run"))
    code = ("import sys, time; from saeray.store import Store; from saeray.run.lease import Lease; "
            f"Lease(Store.open({str(tmp_path / 'run')!r}), 'r', 600).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(L.LeaseHeld):                 # alive: refused, whatever take_dead says
            L.Lease(run, "r", 600).acquire()
    finally:
        p.kill()
        p.wait()
    gen, rec = current(run)
    assert gen == 1 and not rec["released"] and L.holder_gone(rec)
    with pytest.raises(L.LeaseHeld):
        L.Lease(run, "r", 600, take_dead=False).acquire()
    for k, v in (("host", "elsewhere"), ("pidns", "pid:[1]"), ("boot", "another-boot")):
        assert not L.holder_gone({**rec, "owner": {**rec["owner"], k: v}}), k
    lease = L.Lease(run, "r", 600).acquire()
    try:
        assert lease.gen == 2 and current(run)[1]["owner"]["pid"] == os.getpid()
    finally:
        lease.release()


# ---- two audits, one run name (CLI, real local Ray) ------------------------------------------------

def _spec(model: str, store: str, lease_s: float = 30) -> dict:
    return {"name": "lz", "model": {"name": model},
            "corpus": {"n_docs": 256, "context_len": 64, "heldout_docs": 32},
            "hookpoints": ["resid_post.1"],
            "harvest": {"batch_size": 16, "unit_contexts": 16},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    # a Ray task per hook point: the lease is under test, Ray Train's start-up is not
                    "train": {"tokens": 6000, "batch_size": 200, "checkpoint_every": 5, "launcher": "task"}},
            "evaluation": {"pipelines": 1, "batch_size": 16, "probes": False},
            "dashboards": {"enabled": False},
            # the expiry path, as for a holder on another machine: a dead holder on this machine would
            # be taken over at once (test_a_dead_holder_on_this_machine_is_taken_over_at_once)
            "store": {"url": store, "lease_seconds": lease_s, "lease_takeover": False},
            "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5}, "eval": {"num_cpus": 0.5}}}


def _audit(gcs: str, spec: Path, log: Path) -> subprocess.Popen:
    # own process group: SIGKILL reaches this driver and nothing else of the session's (its Ray
    # workers belong to the session's Ray, which ends a dead driver's job and its workers)
    return subprocess.Popen([sys.executable, "-m", "saeray", "--address", gcs, "audit", str(spec)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _changed(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def _harvest_units(root: Path) -> int:
    d = root / "targets" / "neox@main" / "_records" / "harvest"
    return len([p for p in d.glob("*.json") if not p.name.startswith(".")]) if d.is_dir() else 0  # not temporaries


def _refused(gcs: str, spec: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "saeray", "--address", gcs, "audit", str(spec)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "error: run folder" in r.stderr and "is in use by another saeray process" in r.stderr
    assert "another run name" in r.stderr and "store.lease_seconds" in r.stderr
    return r


@pytest.mark.slow
def test_two_audits_one_run_name_then_kill_expire_resume(ray_local, tiny_model, tmp_path):
    # A, paused, no longer renews; B and C must both start up and be refused before its lease expires:
    # at most ttl/4 since A's last renewal, then B, 2 s, C (each 3.6-3.8 s here, 2026-12-05), so 60 s
    # leaves ~3x their time; the test then waits the rest of the TTL out
    lease_s = 60.0
    store = tmp_path / "store"
    root = store / "lz"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(tiny_model, str(store), lease_s)))
    gcs = ray_local.get_runtime_context().gcs_address
    # what A's Ray actors (not paused with its driver) may still be writing: activations, SAE checkpoints
    actor_data = ("targets/neox@main/acts/", "targets/neox@main/saes/")

    # A starts and gets to work (its lease exists, harvest units recorded)
    a = _audit(gcs, spec, tmp_path / "a.log")
    try:
        deadline = time.monotonic() + 300
        while a.poll() is None and _harvest_units(root) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.poll() is None and _harvest_units(root) >= 2, (tmp_path / "a.log").read_text()[-3000:]
        assert current(Store.open(str(root)))[1]["owner"]["pid"] == a.pid

        # B, same spec and run name, while A's driver is paused (so whatever changes is B's doing,
        # apart from A's actors finishing the files they are writing): refused, exit 4
        os.killpg(a.pid, signal.SIGSTOP)
        before = _listing(root)
        t0 = time.monotonic()
        b = _refused(gcs, spec)
        b_wall = time.monotonic() - t0
        after = _listing(root)
        assert f"pid {a.pid}" in b.stderr and str(root) in b.stderr
        assert {k for k in _changed(before, after) if not k.startswith(actor_data)} == set(), "B wrote into the run"
    finally:
        # SIGKILL A, still paused mid-harvest (its process group: the driver); no release happens, its
        # lease stays until it expires
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    units_at_kill = _harvest_units(root)
    time.sleep(2)   # A's actors finish what they were writing; then nothing moves in the run folder
    before = _listing(root)

    # C at once: refused (A's lease has not expired), writing nothing
    t0 = time.monotonic()
    _refused(gcs, spec)
    c1_wall = time.monotonic() - t0
    expires = L._epoch(current(Store.open(str(root)))[1]["expires"])
    assert L.now() < expires, "the refusal must come before A's lease could expire"
    assert _changed(before, _listing(root)) == set()

    # after the expiry C runs, resumes A's finished units and finishes with exact row counts
    time.sleep(max(0.0, expires - L.now()) + 0.5)
    t0 = time.monotonic()
    c2 = subprocess.run([sys.executable, "-m", "saeray", "--address", gcs, "audit", str(spec)],
                        capture_output=True, text=True, timeout=900)
    print(f"B refused in {b_wall:.1f} s, C in {c1_wall:.1f} s; A killed at {units_at_kill} units; "
          f"C resumed and finished in {time.monotonic() - t0:.1f} s")
    (tmp_path / "c.log").write_text(c2.stderr)
    assert c2.returncode == 0, c2.stderr[-5000:]
    gen, rec = current(Store.open(str(root)))
    assert gen == 2 and rec["released"] and rec["owner"]["pid"] != a.pid
    man = json.loads((root / "manifest.json").read_text())
    h = man["targets"]["neox@main"]["stages"]["harvest"]
    assert h["status"] == "done"
    n_units = h["result"]["units"]
    assert units_at_kill >= 2
    # C skipped the units A had recorded and harvested only the rest (on a fast machine A may have
    # finished the harvest before it was killed: then C harvests nothing again)
    if units_at_kill < n_units:
        assert f"{n_units - units_at_kill} of {n_units} units to do ({units_at_kill} already recorded)" in c2.stderr
    else:
        assert "units to do" not in c2.stderr
    import pyarrow.dataset as pads

    from saeray.harvest.corpus import Corpus
    from saeray.models.load import load_tokenizer
    from saeray.spec import parse_spec

    parsed = parse_spec(json.dumps(_spec(tiny_model, str(store))))
    want = Corpus(parsed.corpus, load_tokenizer(tiny_model)).contexts(0, parsed.corpus.n_docs).rows()
    assert h["result"]["rows"] == want
    for hp in ("resid_post.1",):
        t = pads.dataset(str(root / "targets" / "neox@main" / "acts" / hp), format="parquet").to_table(["doc", "pos"])
        assert t.num_rows == want                                              # none lost
        assert len(set(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))) == want  # none duplicated
    assert json.loads((root / "report" / "summary.json").read_text())["saes"]


def test_report_rebuild_waits_for_the_run_it_would_write_into(tmp_path):
    """`saeray report RUN` writes into the run folder: refused (exit 4) while an audit holds the run."""
    run = Store.open(str(tmp_path / "r"))
    run.write_json("manifest.json", {"run": "r", "spec": {"store": {"lease_seconds": 600}}})
    lease = Lease(run, "r", 600).acquire()
    try:
        p = subprocess.run([sys.executable, "-m", "saeray", "report", str(tmp_path / "r")], capture_output=True,
                           text=True, timeout=120)
    finally:
        lease.release()
    assert p.returncode == 4 and "is in use by another saeray process" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "report").exists()

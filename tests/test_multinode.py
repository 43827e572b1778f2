"""A multi-node Ray cluster on this machine: a head (0 CPUs: GCS and driver only) and two worker
nodes, each started with ``ray start --block`` on 127.0.0.1 (the workers through Ray's own CLI with
one guard lifted: see WORKER_START) with its own ports, temp dir and custom resources, and stopped
by PID. Two targets are audited with ``resources.<stage>.custom: {shard: 1}``;
each worker node holds one ``shard``, so the two stages of every pipeline land on different nodes
and the hidden states between them cross node boundaries through the object store. The results
(activations of every hook point, SAE weights) must equal those of the same spec on one node."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import free_port

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MODEL = "storyworld-tiny-2l"
REVISIONS = ["step16", "main"]
HOOKPOINTS = ["resid_post.0", "resid_post.1"]
SAE_NAME = "topk-w64-k4"
CONTEXT_LEN, BATCH, D_MODEL = 64, 16, 64   # storyworld-tiny-2l: d_model 64


# ---- a multi-node Ray on 127.0.0.1, every process ours and stopped by PID ------------------------

def ray_env() -> dict:
    """The environment of every Ray process we start (as cluster/local.sh and saeray.raycluster set it)."""
    from saeray.raycluster import _TRAIN_ENV

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0", "OMP_WAIT_POLICY": "PASSIVE", **_TRAIN_ENV,
           # as cluster/local.sh: no Serve replicas to drain, so SIGTERM need not wait Ray's 30 s
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return env


# `ray start` for a worker node on 127.0.0.1: Ray's own CLI (ray.scripts.scripts.main, what the `ray`
# executable runs) with one guard lifted. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray on
# loopback) `ray start --address` aborts ("Multi-node Ray clusters are not supported on Windows and
# OSX"); with it on, `ray start` rewrites 127.0.0.1 in --address and --node-ip-address to this
# machine's outward IP (Ray 2.60, services.resolve_ip_for_localhost), and with a node IP other than
# 127.0.0.1 (127.0.0.2, ...) the GCS and raylet listen on every interface. So: the guard sees the
# flag on; everything else (this process and every Ray process it starts) sees it off.
WORKER_START = """\
import sys, types
import ray._private.ray_constants as rc
from ray.scripts import scripts
view = types.ModuleType(rc.__name__)
view.__dict__.update(rc.__dict__)
view.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = view
sys.exit(scripts.main())
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (free_port twice may hand back the same one)."""
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    temp_dir: str
    log: Path
    descendants: set[int] = field(default_factory=set)   # raylet, GCS, agents, workers: seen while alive

    @property
    def pid(self) -> int:
        return self.proc.pid

    def seen(self) -> None:
        try:
            self.descendants |= {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.Error:
            pass


def start_node(name: str, root: Path, logs: Path, env: dict, *, head_port: int, head: bool = False,
               num_cpus: int = 0, resources: dict | None = None, object_store_mb: int = 256) -> RayNode:
    """``ray start --block`` on 127.0.0.1 as our own subprocess: the head (``head=True``, GCS on
    ``head_port``) or a worker joining it. Every port with a fixed default gets a free one; workers
    bind OS-assigned ports (``--min/max-worker-port 0``), so no range can clash with another Ray on
    this machine. Each node has its own short temp dir (Ray's unix sockets need short paths)."""
    tmp = root / name
    tmp.mkdir()
    agent, agent_grpc, renv, metrics, nm, om = free_ports(6)
    args = ["start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
            "--object-store-memory", str(object_store_mb * 1024**2), "--temp-dir", str(tmp),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(nm), "--object-manager-port", str(om),
            "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
    if head:
        dash, client = free_ports(2)
        cmd = [RAY, *args, "--head", "--port", str(head_port), "--include-dashboard", "false",
               "--dashboard-port", str(dash), "--ray-client-server-port", str(client)]
    else:
        cmd = [sys.executable, "-c", WORKER_START, *args, "--address", f"127.0.0.1:{head_port}"]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(name, proc, str(tmp), log)


def stop_node(node: RayNode, wait_s: float = 60) -> None:
    """SIGTERM (``ray start --block`` drains, then stops its raylet, GCS, agents), bounded wait, SIGKILL."""
    node.seen()
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(30)


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            pass
    return out


def chunks_received(node: RayNode) -> int:
    """Object chunks this node's object manager pulled from other nodes (the raylet's
    debug_state.txt, rewritten every few seconds)."""
    import re

    n = 0
    for f in Path(node.temp_dir).glob("session_*/logs/debug_state.txt"):
        n = max([n, *(int(x) for x in re.findall(r"num chunks received total: (\d+)", f.read_text()))])
    return n


def listening(pids: set[int]) -> set[str]:
    """The addresses our processes listen on (TCP)."""
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.pid in pids and c.status == psutil.CONN_LISTEN}


def cluster_nodes(address: str, env: dict, want: int, nodes: list[RayNode], timeout_s: float = 120) -> list[dict]:
    """Alive nodes of the cluster (``ray.nodes()``), from a short-lived driver that waits (bounded)
    until ``want`` of them are alive (our own process already holds the session's local Ray).
    Fails at once, with its log, if one of our ``ray start`` processes exits meanwhile."""
    code = textwrap.dedent(f"""\
        import json, time, ray
        ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
        deadline = time.monotonic() + {timeout_s}
        while True:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) >= {want} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(json.dumps([{{"id": n["NodeID"], "resources": n["Resources"]}} for n in nodes]))
        """)
    q = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + timeout_s + 90
        while q.poll() is None and time.monotonic() < deadline:
            for n in nodes:
                assert n.proc.poll() is None, f"ray start ({n.name}) exited: {n.log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        if q.poll() is None:
            q.kill()
        out, err = q.communicate(timeout=30)
    assert q.returncode == 0, (out + err)[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def ray_cluster(tmp_path):
    """Head (0 CPUs: GCS and drivers) + node_a + node_b (1 CPU and one `shard` each), all on
    127.0.0.1; yields (address, env, {"head"|"node_a"|"node_b": node id}, nodes). Stopped by PID in
    `finally`: workers first, then the head; every process they started must be gone."""
    env = ray_env()
    root = Path(tempfile.mkdtemp(prefix="saeray-mn-", dir="/tmp"))
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        nodes.append(start_node("h", root, logs, env, head_port=port, head=True, num_cpus=0))
        for name in ("node_a", "node_b"):
            nodes.append(start_node(name[-1], root, logs, env, head_port=port, num_cpus=1,
                                    resources={name: 1, "shard": 1}))
        found = cluster_nodes(address, env, 3, nodes)
        assert len(found) == 3, found
        ids = {"head": next(n["id"] for n in found if "node:__internal_head__" in n["resources"])}
        for name in ("node_a", "node_b"):
            ids[name] = next(n["id"] for n in found if n["resources"].get(name) == 1)
        res = {n["id"]: n["resources"] for n in found}
        assert res[ids["head"]].get("CPU", 0) == 0 and "shard" not in res[ids["head"]]
        assert all(res[ids[k]].get("shard") == 1 and res[ids[k]].get("CPU") == 1 for k in ("node_a", "node_b"))
        assert all("node:127.0.0.1" in r for r in res.values())        # every node on loopback
        for n in nodes:
            n.seen()
        ours = set().union(*(n.descendants for n in nodes)) | {n.pid for n in nodes}
        assert listening(ours) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening(ours)
        yield address, env, ids, nodes
    finally:
        for n in reversed(nodes):      # workers first, then the head
            stop_node(n)
        spawned = set().union(*(n.descendants for n in nodes)) if nodes else set()
        gone_by = time.monotonic() + 60
        while alive(spawned) and time.monotonic() < gone_by:
            time.sleep(0.5)
        left = alive(spawned)
        for pid in left:               # ours (started by our `ray start`s): never leak them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        for n in nodes:
            assert n.proc.returncode is not None and not psutil.pid_exists(n.pid), f"{n.name} ({n.pid}) still runs"
        assert not left, f"Ray processes outlived their node's `ray start`: {sorted(left)}"


# ---- the audit ------------------------------------------------------------------------------------

def write_spec(path: Path, name: str, store: Path, custom: bool) -> Path:
    c = ", custom: {shard: 1}" if custom else ""
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{name: {MODEL}, revisions: [{", ".join(REVISIONS)}]}}
        corpus: {{n_docs: 48, context_len: {CONTEXT_LEN}, heldout_docs: 16}}
        hookpoints: ["resid_post.*"]
        harvest: {{stages: 2, batch_size: {BATCH}, unit_contexts: 16, dtype: float32}}
        sae:
          architectures: [{{arch: topk, width: 64, k: 4}}]
          train: {{tokens: 4000, batch_size: 256}}
        evaluation: {{probes: false}}
        dashboards: {{enabled: false}}
        store: {store}
        resources:
          harvest: {{num_cpus: 0.5{c}}}
          eval: {{num_cpus: 0.5{c}}}
          train: {{num_cpus: 0.5}}
        """))
    return path


def read_acts(target: Path, hookpoint: str):
    import pyarrow.dataset as ds

    t = ds.dataset(target / "acts" / hookpoint, format="parquet").to_table()
    return t.sort_by([("doc", "ascending"), ("pos", "ascending")])


def test_two_targets_across_nodes_match_one_node(ray_cluster, ray_local, tmp_path):
    from safetensors.numpy import load_file

    from saeray.harvest.schema import acts_to_numpy
    from saeray.run.audit import run_audit
    from saeray.spec import load_spec
    from saeray.storyworld.zoo import resolve

    address, env, ids, nodes = ray_cluster
    workers = {ids["node_a"], ids["node_b"]}
    for rev in REVISIONS:            # build the test zoo (seconds) before the clocks below start
        resolve(MODEL, rev, progress=False)
    # the hidden states between the stages are too large for Ray to inline in a task reply: they
    # go through the plasma store (max_direct_call_object_size 100 KiB), i.e. node to node here
    assert BATCH * CONTEXT_LEN * D_MODEL * 4 > 100 * 1024

    # the multi-node run: a driver process on the head node
    mn_store = tmp_path / "mn-store"
    spec = write_spec(tmp_path / "mn.yaml", "mn", mn_store, custom=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "saeray", "--address", address, "audit", str(spec)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    t_mn = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    manifest = json.loads((mn_store / "mn" / "manifest.json").read_text())
    tids = [f"{MODEL}@{rev}" for rev in REVISIONS]
    assert sorted(manifest["targets"]) == sorted(tids)
    for tid in tids:
        t = manifest["targets"][tid]
        assert {s: t["stages"][s]["status"] for s in ("harvest", "train", "evaluate")} == dict.fromkeys(
            ("harvest", "train", "evaluate"), "done")
        placed = t["stages"]["harvest"]["result"]["timing"]["nodes"]
        assert len(placed) == 1 and len(placed[0]) == 2, placed    # one pipeline of two stages
        assert set(placed[0]) == workers, (placed, ids)            # one stage on each worker node
    # and the hidden states did travel: the worker nodes' object managers pulled chunks from each other
    received = {n.name: chunks_received(n) for n in nodes}
    assert received["a"] + received["b"] > 0, received
    summary = json.loads((mn_store / "mn" / "report" / "summary.json").read_text())
    rows = {(s["revision"], s["hookpoint"]): s for s in summary["saes"]}
    assert set(rows) == {(rev, hp) for rev in REVISIONS for hp in HOOKPOINTS}
    assert all(s["arch"] == "topk" and s["ce_loss_recovered"] is not None for s in rows.values())

    # the same spec on one node (the session's local Ray has no custom resources)
    one_store = tmp_path / "one-store"
    t0 = time.monotonic()
    run_audit(load_spec(str(write_spec(tmp_path / "one.yaml", "one", one_store, custom=False))))
    t_one = time.monotonic() - t0
    for tid in tids:
        mn_t, one_t = mn_store / "mn" / "targets" / tid, one_store / "one" / "targets" / tid
        for hp in HOOKPOINTS:
            a, b = read_acts(mn_t, hp), read_acts(one_t, hp)
            assert a.num_rows == b.num_rows > 0
            for col in ("doc", "pos", "token"):
                assert a[col].equals(b[col]), (tid, hp, col)
            xa, xb = acts_to_numpy(a["act"]), acts_to_numpy(b["act"])
            assert xa.dtype == np.float32 and xa.shape == (a.num_rows, D_MODEL)
            # float32, same layer split, same thread count, same batches: bit for bit
            np.testing.assert_array_equal(xa, xb, err_msg=f"{tid} {hp}")
            wa = load_file(str(mn_t / "saes" / hp / SAE_NAME / "sae_weights.safetensors"))
            wb = load_file(str(one_t / "saes" / hp / SAE_NAME / "sae_weights.safetensors"))
            assert sorted(wa) == sorted(wb) and wa
            for k in wa:                 # same data, same seed, same threads: the same SAE
                np.testing.assert_array_equal(wa[k], wb[k], err_msg=f"{tid} {hp} {k}")
    print(f"multi-node audit {t_mn:.1f} s (object chunks received per node: {received}), "
          f"one-node audit {t_one:.1f} s")

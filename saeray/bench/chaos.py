"""``saeray bench chaos``: many small work items through the model pool while workers are killed.

The items go through the same machinery as a sweep (:class:`saeray.models.pool.ModelPool` with a
direct job on a real checkpoint, one :class:`saeray.run.records.Records` entry written per finished
item), on a local Ray this process starts, while a chaos thread SIGKILLs one pool worker process at
a time. What it checks is the pool's promise: every item's result is recorded exactly once and is
the right one, however many attempts died, and the driver's memory does not grow with the number
of items (it holds references to the items in flight, not to every item of the run).

The per-item work is deliberately tiny (one forward of four tokens through a random 2-layer
GPT-NeoX): the point is orchestration, records and fault handling, not the model.

Kills are bounded (``max_kills``) and spaced: after a kill the thread waits until the victim
answers again (Ray restarted it and it reloaded its layers), then ``kill_every`` seconds, so the
run makes progress between kills instead of measuring only restarts. Only PIDs that are both
reported by this pool's own actors and descendants of this process running a ``PoolWorker`` are
ever signalled.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models.pool import DirectJob

log = logging.getLogger("saeray")

N_LAYERS, D_MODEL, VOCAB = 2, 32, 97
N_INPUTS = 97   # distinct token sequences: every item's model output is checked against a reference


# ---- what an item is and what its result must be (pure, shared by the job and the check) --------

def item_key(i: int) -> str:
    return f"i{i:06d}"


def item_index(key: str) -> int:
    return int(key[1:])


def item_ids(i: int) -> list[int]:
    """The item's four input tokens (one of N_INPUTS sequences)."""
    j = i % N_INPUTS
    return [j % VOCAB, (3 * j + 1) % VOCAB, (7 * j + 2) % VOCAB, (11 * j + 5) % VOCAB]


def item_value(i: int) -> int:
    """A number only item ``i`` produces: a record under another item's key shows up as wrong."""
    return (i * 2654435761) % 2**32


def check_results(n: int, records: dict[str, dict], calls: np.ndarray, tokens: dict[int, int]) -> dict:
    """Compare what the run recorded with what it should have: ``records`` (key -> record),
    ``calls[i]`` (how many times the pool reported item i finished), ``tokens`` (input index ->
    the reference model's next token). Counts, not exceptions, so a bad run reports everything."""
    want = {item_key(i) for i in range(n)}
    missing = len(want - set(records))
    extra = len(set(records) - want)
    wrong = 0
    for key, rec in records.items():
        if key not in want:
            continue
        i = item_index(key)
        if rec.get("i") != i or rec.get("value") != item_value(i) or rec.get("token") != tokens.get(i % N_INPUTS):
            wrong += 1
    calls = np.asarray(calls)
    return {"items": n, "recorded": len(records), "missing": missing, "extra": extra, "wrong": wrong,
            "duplicates": int(np.clip(calls - 1, 0, None).sum()), "never_reported": int((calls == 0).sum())}


class ChaosJob(DirectJob):
    """One item = one forward of its four tokens; the result names the item, its value, the model's
    next token and the worker that computed it."""

    def __init__(self, stage, device, work_ms: float = 0.0):
        self.stage, self.device, self.work_ms = stage, device, work_ms

    def begin(self, item: str) -> None:
        self.out = None

    def run(self, payload: dict) -> None:
        i = payload["i"]
        with torch.inference_mode():
            logits = self.stage(torch.tensor([item_ids(i)], device=self.device), logits=True).output
        if self.work_ms:
            time.sleep(self.work_ms / 1000)
        self.out = {"i": i, "value": item_value(i), "token": int(logits[0, -1].argmax()), "pid": os.getpid()}

    def finish(self, item: str) -> dict:
        return self.out


def make_model(folder: Path) -> str:
    """A random 2-layer GPT-NeoX (safetensors, no tokenizer needed: items are token ids)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16)
        GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def reference_tokens(model: str) -> dict[int, int]:
    """The next token of every input sequence, computed in this process (not by the pool)."""
    from ..models.shard import Stage

    stage = Stage.from_pretrained(model, (0, N_LAYERS))
    with torch.inference_mode():
        out = stage(torch.tensor([item_ids(j) for j in range(N_INPUTS)]), logits=True).output
    return {j: int(t) for j, t in enumerate(out[:, -1].argmax(-1))}


# ---- the chaos thread --------------------------------------------------------------------------

def our_pool_worker(pid: int, marker: str = "PoolWorker") -> bool:
    """Is ``pid`` a descendant of this process running a pool worker? (Ray names a worker process
    after its actor class.) Anything else is never signalled."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        if p.pid == pid:
            try:
                return any(marker in part for part in p.cmdline())
            except psutil.Error:
                return False
    return False


class Chaos:
    """SIGKILL a random actor's process every ``every_s`` seconds of healthy running, at most
    ``max_kills`` times, once :meth:`arm` is called; :meth:`stop` ends it."""

    def __init__(self, actors: Callable[[], list], every_s: float, max_kills: int, seed: int = 0):
        self.actors, self.every_s, self.max_kills = actors, every_s, max_kills
        self.rng = random.Random(seed)
        self.kills: list[dict] = []
        self.skipped = 0
        self._armed, self._stop = threading.Event(), threading.Event()
        self._t = threading.Thread(target=self._loop, name="saeray-chaos", daemon=True)

    def __enter__(self) -> "Chaos":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def arm(self) -> None:
        self._armed.set()

    def stop(self) -> None:
        self._stop.set()
        self._armed.set()
        self._t.join(timeout=120)

    def _pid(self, actor, timeout: float) -> int | None:
        import ray

        try:
            return ray.get(actor.pid.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - dead, restarting or torn down: no victim this round
            return None

    def _loop(self) -> None:
        self._armed.wait()
        while len(self.kills) < self.max_kills and not self._stop.wait(self.every_s):
            actors = self.actors()
            if not actors:
                continue
            actor = self.rng.choice(actors)
            pid = self._pid(actor, timeout=60)
            if pid is None or self._stop.is_set() or not our_pool_worker(pid):
                self.skipped += 1
                continue
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kill = {"pid": pid, "at_s": round(t0, 3)}
            self.kills.append(kill)
            log.info(f"chaos: killed pool worker PID {pid} ({len(self.kills)}/{self.max_kills})")
            # wait until Ray restarted it (a new process, layers reloaded) before the next interval
            deadline = t0 + 300
            while not self._stop.is_set() and time.monotonic() < deadline:
                new = self._pid(actor, timeout=10)
                if new is not None and new != pid:
                    kill["restart_s"] = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.2)


class _Rss:
    """This process's resident memory: a point reading, and the peak sampled in a thread."""

    def __init__(self, every_s: float = 0.1):
        import psutil

        self.proc, self.every_s = psutil.Process(), every_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def now(self) -> int:
        gc.collect()
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> "_Rss":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# ---- the benchmark -----------------------------------------------------------------------------

def run_bench(items: int = 10_000, kill_every: float = 3.0, max_kills: int = 10, replicas: int = 2,
              warmup: int = 500, max_in_flight: int = 2, work_ms: float = 0.0, seed: int = 0,
              store: str | None = None, workdir: str | None = None) -> dict:
    """Run ``items`` items through a ``replicas``-pipeline pool on a local Ray (started here unless
    one is already initialised in this process), killing a worker every ``kill_every`` s of
    healthy running (at most ``max_kills``; 0 = no chaos), and check every result.

    Driver RSS is read after ``warmup`` items (actors up, code paths warm, first records written)
    and again when the last item is recorded; kills start after the warm-up reading."""
    import ray

    from ..models.pool import Item, Load, ModelPool
    from ..raycluster import local_env
    from ..run.records import Records
    from ..store import Store

    if items < 1 or replicas < 1 or max_kills < 0 or kill_every <= 0:
        raise ValueError("items and replicas must be >= 1, max_kills >= 0, kill_every > 0")
    warmup = min(warmup, max(items // 10, 1))
    own_ray = not ray.is_initialized()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="saeray-chaos-")
        workdir = tmp.name
    work = Path(workdir)
    try:
        if own_ray:
            local_env()
            ray.init(address="local", num_cpus=replicas, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 2**20)
        model = make_model(work / "model")
        run_store = Store.open(store or str(work / "store")) / f"chaos-{int(time.time())}-{os.getpid()}"
        records = Records(run_store, "items")
        calls = np.zeros(items, dtype=np.int32)    # preallocated: the tally itself does not grow
        state = {"done": 0, "rss_start": None, "t_warm": None}
        trace: list[float] = []                     # driver RSS (MB) every tenth of the items
        every = max(items // 10, 1)
        width = max(6, len(str(items - 1)))
        if width > 6:
            raise ValueError(f"items: at most 1 000 000 (keys are i######), got {items}")

        def source():
            # a generator, as a caller streaming a huge grid would hand it: the pool must not hold all
            for i in range(items):
                yield Item(item_key(i), lambda i=i: iter([(None, {"i": i}, None)]))

        with _Rss() as rss:
            def on_item(key: str, parts: list) -> None:
                (res,) = parts
                i = item_index(key)
                calls[i] += 1
                records.put(key, {"i": res["i"], "value": res["value"], "token": res["token"]})
                state["done"] += 1
                if state["done"] % every == 0:
                    trace.append(round(rss.proc.memory_info().rss / 2**20, 1))
                if state["done"] == warmup:
                    state["rss_start"], state["t_warm"] = rss.now(), time.perf_counter()
                    chaos.arm()

            t0 = time.perf_counter()
            with ModelPool(Load(model, threads=1), [(0, N_LAYERS)], ChaosJob, [{"work_ms": work_ms}],
                           replicas=replicas, resources={"CPU": 1}, max_in_flight=max_in_flight,
                           max_restarts=max_kills + 1, name="chaos") as pool:
                t_up = time.perf_counter()
                with Chaos(lambda: pool.actors, kill_every, max_kills, seed=seed) as chaos:
                    if not max_kills:
                        chaos.stop()
                    timing = pool.run(source(), on_item)
                    rss_end = rss.now()
                    t_end = time.perf_counter()
                    chaos.stop()
        recorded = records.consolidate()
        check = check_results(items, recorded, calls, reference_tokens(model))
        rss_start = state["rss_start"] or rss_end
        steady = t_end - (state["t_warm"] or t_up)
        mb = 2**20
        return {
            "items": items, "replicas": replicas, "kill_every_s": kill_every, "max_kills": max_kills,
            "kills": len(chaos.kills), "restart_s": [k.get("restart_s") for k in chaos.kills],
            "retries": timing.get("retries", 0), "wall_s": round(t_end - t0, 2),
            "pool_start_s": round(t_up - t0, 2), "items_per_s": round(items / max(t_end - t_up, 1e-9), 1),
            "steady_items_per_s": round((items - min(warmup, items)) / max(steady, 1e-9), 1),
            "rss_start_mb": round(rss_start / mb, 1), "rss_end_mb": round(rss_end / mb, 1),
            "rss_peak_mb": round(rss.peak / mb, 1), "rss_ratio": round(rss_end / rss_start, 4),
            "rss_trace_mb": trace, "warmup_items": warmup, **check,
            "ok": check["missing"] == 0 and check["extra"] == 0 and check["wrong"] == 0
            and check["duplicates"] == 0,
        }
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


def render(res: dict) -> str:
    kills = f"{res['kills']} kills" + (f" (restart {min(r for r in res['restart_s'] if r)}-"
                                        f"{max(r for r in res['restart_s'] if r)} s)"
                                        if any(res["restart_s"]) else "")
    return "\n".join([
        f"chaos: {res['items']} items on {res['replicas']} pipeline(s), {kills}, {res['retries']} item attempts re-run",
        f"  wall {res['wall_s']} s (pool start {res['pool_start_s']} s), {res['items_per_s']} items/s "
        f"({res['steady_items_per_s']} after warm-up)",
        f"  results: {res['recorded']} recorded, {res['missing']} missing, {res['duplicates']} duplicated, "
        f"{res['wrong']} wrong, {res['extra']} unexpected",
        f"  driver RSS: {res['rss_start_mb']} MB after {res['warmup_items']} items -> {res['rss_end_mb']} MB at the "
        f"end (x{res['rss_ratio']}), peak {res['rss_peak_mb']} MB",
        "  OK" if res["ok"] else "  FAILED: results are not exact",
    ])


def main() -> None:   # python -m saeray.bench.chaos [items] [kill_every] [max_kills]
    import sys

    logging.basicConfig(level=logging.INFO)
    args = [float(a) for a in sys.argv[1:]]
    res = run_bench(items=int(args[0]) if args else 10_000, kill_every=args[1] if len(args) > 1 else 3.0,
                    max_kills=int(args[2]) if len(args) > 2 else 10)
    print(render(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()

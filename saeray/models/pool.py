"""The model pool: the one Ray layer through which every stage talks to a model.

A pool is ``replicas`` pipelines, each a chain of contiguous layer-range actors of one frozen
checkpoint (:class:`PoolWorker`, a plain object around a :class:`~saeray.models.shard.Stage`, plus
a *job*: the stage-specific object that captures, intervenes, writes or scores). The driver hands
the pool *items* (a harvest work unit, a held-out evaluation batch, a sweep request); an item is a
short sequence of batches that enter the first actor and flow to the last, and it ends with
``finish`` on every actor, whose answers are the item's result::

    driver ──ids──▶ stage 0 ──hidden (object store)──▶ stage 1 ──▶ ... ──▶ finish(item) ─▶ on_item
               (one pipeline per replica; at most max_in_flight batches in flight each)

* **Backpressure.** Each pipeline holds at most ``max_in_flight`` batches; the driver keeps only
  object references, so its memory does not grow with the corpus.
* **Failures.** An actor whose process dies is restarted by Ray (it reloads its layers); a restarted
  actor no longer holds the item, answers :class:`ItemLost`, and the pool re-runs the item as a new
  attempt (at most ``max_attempts``). Only the failed item's pipeline pauses until its actors
  answer again; the other pipelines keep working, and may take the re-run. Jobs keep their state
  per item, so a re-run item neither loses nor double-counts anything.
* **Placement.** All actors of a pool are reserved at once in one placement group (every bundle
  or none), so pools of several targets waiting for the same GPUs or custom resources never
  deadlock half-built; a pool waits (and says so) until the cluster can hold it.
* **Teardown.** ``with ModelPool(...) as pool:`` kills the actors and frees the placement group
  when the block ends, whether the stage finished or failed.
* **Direct jobs.** A job with ``direct = True`` (the sweeps) gets the whole model in one actor
  (one stage spanning every layer) and ``run(payload)`` instead of one forward per batch: its work
  is many dependent passes (backward, batched ablations, greedy decoding) that cannot be cut into
  a feed-forward pipeline. It keeps everything else: placement, backpressure, retries, teardown.
* **Gradients.** A job with ``grad = True`` runs its stage's forward with autograd on (the other
  stages of the pipeline under ``no_grad``); :func:`grad_ranges` keeps every layer a request
  needs, from its first hook point to the logits, in one stage so gradients never cross actors.

* **Resumed passes.** A job may answer ``resume(payload)`` for a batch that repeats an earlier
  pass of its item up to layer L (evaluation's ablations and splices): the stages before L send
  nothing and the one holding L starts at block L from the state the job kept.

Jobs implement :class:`Job`; the worker is exercised without Ray in tests.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..errors import InputError, SaerayError

log = logging.getLogger("saeray")

MAX_ATTEMPTS = 4
MAX_RESTARTS = 3


class ItemLost(RuntimeError):
    """The worker does not hold this item (it was restarted, or never began it): re-run the item."""


class Job(Protocol):
    """What a stage plugs into every worker of its pool. One instance per worker; ``payload`` is
    the same dict on every stage of a pipeline."""

    logits: bool      # does the last stage compute logits?
    grad: bool        # forward with autograd (gradient mode)?

    def begin(self, item: str) -> None: ...
    def capture(self, payload: dict) -> list[str]: ...
    def interventions(self, payload: dict) -> dict | None: ...
    def on_acts(self, payload: dict, acts: dict[str, torch.Tensor]) -> None: ...
    def on_output(self, payload: dict, output: torch.Tensor) -> Any: ...   # last stage only
    # optional: ``resume(payload)`` for a batch that repeats an earlier pass of the item up to some
    # layer L and differs from there on (an intervention at L): ``(L, hidden entering block L)`` kept
    # from that pass when L is in this stage, :data:`UNCHANGED` when L is beyond it, else None
    # direct jobs (``direct = True``) implement ``run(payload) -> Any`` instead of the four above
    def finish(self, item: str) -> Any: ...


UNCHANGED = "unchanged"   # Job.resume: this stage's output equals the earlier pass's, so skip it


class DirectJob:
    """Base of a *direct* job: the worker hands it its whole-model stage in ``run(payload)`` (its
    work is many dependent passes, not one forward per batch); the per-batch hooks of an ordinary
    job are unused."""

    direct = True
    logits = True
    grad = False

    def begin(self, item: str) -> None:
        self.out: list = []

    def run(self, payload: dict) -> Any:
        raise NotImplementedError

    def finish(self, item: str) -> list:
        return self.out

    def capture(self, payload: dict) -> list[str]:
        return []

    def interventions(self, payload: dict):
        return None

    def on_acts(self, payload: dict, acts: dict) -> None:
        pass

    def on_output(self, payload: dict, output: torch.Tensor):
        return None


@dataclass(frozen=True)
class Load:
    """Which checkpoint to load and how (everything a worker needs besides its layer range)."""

    path: str
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def of(cls, ref, resources=None) -> "Load":
        """From a :class:`saeray.modelref.ModelRef` and the spec's actor resources."""
        gpus = getattr(resources, "num_gpus", 0) or 0
        cpus = getattr(resources, "num_cpus", 1) or 1
        return cls(ref.path, ref.revision, ref.dtype, ref.trust_remote_code, "cuda" if gpus > 0 else "cpu",
                   max(1, int(cpus)))


class PoolWorker:
    """One layer range of a frozen model plus a job. Unit-testable without Ray; :func:`actor_class`
    wraps it. Call order per item: ``begin``, ``forward`` per batch, ``finish``."""

    def __init__(self, load: Load, layer_range: tuple[int, int], job_factory: Callable[..., Job],
                 job_args: dict | None = None):
        from .shard import Stage

        if load.threads:
            torch.set_num_threads(load.threads)
        self.device = torch.device(load.device)
        self.stage = Stage.from_pretrained(load.path, tuple(layer_range), revision=load.revision, dtype=load.dtype,
                                           device=load.device, trust_remote_code=load.trust_remote_code)
        self.job = job_factory(stage=self.stage, device=self.device, **(job_args or {}))
        self.current: tuple[str, int] | None = None

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this worker runs on (where placement put it)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def begin(self, item: str, attempt: int = 0) -> None:
        self.job.begin(item)
        self.current = (item, attempt)

    def _check(self, item: str, attempt: int) -> None:
        if self.current != (item, attempt):
            raise ItemLost(f"worker holds {self.current}, not item {item} attempt {attempt}")

    def forward(self, item: str, attempt: int, x: Any, payload: dict) -> Any:
        """One batch through this stage: hidden states for the next stage, or (last stage) what
        the job makes of the output."""
        self._check(item, attempt)
        if getattr(self.job, "direct", False):
            return self.job.run(payload)
        resume = self.job.resume(payload) if hasattr(self.job, "resume") else None
        start = None
        if resume is UNCHANGED:
            if self.stage.is_last:
                raise SaerayError("Job.resume: the last stage cannot be skipped, it makes the batch's result")
            # the stage that resumes holds its own copy of what this one would send
            return None
        if resume is not None:
            start, inputs = resume
        else:
            # arrays from the object store are read-only views: copy before torch owns them
            inputs = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x).to(self.device)
        capture = self.job.capture(payload)
        edits = self.job.interventions(payload)
        grad_here = self.job.grad and bool(capture or edits or self.stage.is_last)
        mode = torch.enable_grad() if grad_here else (torch.no_grad() if self.job.grad else torch.inference_mode())
        with mode:
            out = self.stage(inputs, capture=capture, interventions=edits, logits=self.job.logits,
                             detach=not grad_here, start_layer=start)
            self.job.on_acts(payload, out.acts)
            if self.stage.is_last:
                return self.job.on_output(payload, out.output)
        return out.output.detach().to("cpu")

    def finish(self, item: str, attempt: int = 0) -> Any:
        self._check(item, attempt)
        out = self.job.finish(item)
        self.current = None
        return out


def actor_class(max_restarts: int = MAX_RESTARTS):
    """The Ray actor around :class:`PoolWorker`: restarted by Ray if its process dies (at most
    ``max_restarts`` times over its life); calls are not retried blindly (a restarted worker
    answers ItemLost and the pool re-runs the item)."""
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=0)(PoolWorker)


# ---- plans -----------------------------------------------------------------------------------

def stage_ranges(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """``stages`` contiguous layer ranges of (nearly) equal depth."""
    from .shard import check_boundaries, even_boundaries

    return check_boundaries(even_boundaries(n_layers, stages), n_layers)


def grad_ranges(n_layers: int, stages: int, first_layer: int) -> list[tuple[int, int]]:
    """Ranges for gradient mode: layers before ``first_layer`` (the earliest hook point a request
    differentiates) may be split over ``stages - 1`` stages; ``[first_layer, n_layers)`` is one
    stage, so the backward pass from the logits reaches every requested activation in-process."""
    if not 0 <= first_layer < n_layers:
        raise InputError(f"gradient mode: layer {first_layer} is outside the model's {n_layers} layers")
    head = stage_ranges(first_layer, min(stages - 1, first_layer)) if first_layer and stages > 1 else (
        [(0, first_layer)] if first_layer else [])
    return [*head, (first_layer, n_layers)]


# ---- the driver side ---------------------------------------------------------------------------

@dataclass
class Item:
    """A unit of pool work: ``batches()`` yields ``(x, payload, tag)`` lazily when the item starts
    (x: ids for the first stage; tag: anything, handed back to ``on_batch`` when the batch is done)."""

    key: str
    batches: Callable[[], Iterator[tuple[Any, dict, float]]]


@dataclass
class _Pipe:
    actors: list
    inflight: deque = field(default_factory=deque)   # (item, attempt, ref, tag)
    cur: Any = None                                  # (item, attempt, iterator of batches)
    # while one of its actors restarts: no new batches until every actor answers ``pid`` again
    probe: list | None = None                        # the pending pid refs (None: healthy)
    probe_at: float = 0.0                            # when to ask again after an "unavailable"
    probe_deadline: float = 0.0


RECOVERY_TIMEOUT_S = 300.0   # a restarted actor reloads its layers: seconds, more on a loaded machine


class ModelPool:
    """``replicas`` pipelines of actors over ``ranges`` of one checkpoint, running ``job_factory``
    jobs (``job_args[i]`` for stage i)."""

    def __init__(self, load: Load, ranges: Sequence[tuple[int, int]], job_factory: Callable[..., Job],
                 job_args: Sequence[dict], *, replicas: int = 1, resources: dict | None = None,
                 max_in_flight: int = 4, max_attempts: int = MAX_ATTEMPTS, max_restarts: int = MAX_RESTARTS,
                 name: str = "pool"):
        if len(job_args) != len(ranges):
            raise ValueError("one job_args dict per stage")
        self.load, self.ranges, self.job_factory, self.job_args = load, list(ranges), job_factory, list(job_args)
        self.replicas, self.max_in_flight, self.max_attempts, self.name = replicas, max_in_flight, max_attempts, name
        self.max_restarts = max_restarts
        self.resources = dict(resources or {"CPU": 1})
        self.pipes: list[_Pipe] = []
        self._pg = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "ModelPool":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = self.replicas * len(self.ranges)
        res = {k: v for k, v in self.resources.items() if v}
        opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0)}
        if res.get("memory"):
            opts["memory"] = res["memory"]
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            opts["resources"] = custom
        if res:
            have = ray.cluster_resources()
            short = {k: v for k, v in res.items() if have.get(k, 0) < v * n}
            if short:   # an autoscaler may add nodes; without one this waits until someone does
                log.warning(f"{self.name}: {n} actor(s) of {res} do not fit the cluster as it is now "
                            f"({', '.join(f'{k}: {have.get(k, 0):g}' for k in short)}); waiting for nodes to join")
            self._pg = placement_group([dict(res) for _ in range(n)], strategy="PACK", name=f"saeray-{self.name}")
            waited = 0.0
            while not self._pg.wait(timeout_seconds=30):
                waited += 30
                log.info(f"{self.name}: waiting for the cluster to hold {n} actor(s) of {res} ({waited:.0f} s)")
        Actor = actor_class(self.max_restarts)
        i = 0
        for _ in range(self.replicas):
            actors = []
            for r, args in zip(self.ranges, self.job_args):
                o = dict(opts)
                if self._pg is not None:
                    o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
                actors.append(Actor.options(**o).remote(self.load, r, self.job_factory, args))
                i += 1
            self.pipes.append(_Pipe(actors))
        _wait_alive(self.actors, what=self.name)

    @property
    def actors(self) -> list:
        return [a for p in self.pipes for a in p.actors]

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.pipes = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None

    def node_ids(self) -> list[list[str]]:
        """The Ray node of every actor, one list per pipeline in stage order (placement, recorded
        with the stage's timing)."""
        import ray

        return [ray.get([a.node.remote() for a in p.actors]) for p in self.pipes]

    # -- running items --------------------------------------------------------------------------------
    def run(self, items: Iterable[Item], on_item: Callable[[str, list], None],
            on_batch: Callable[[Any], None] | None = None) -> dict:
        """Run every item; ``on_item(key, [finish result of each stage])`` once per item that
        completed (never for a failed attempt); ``on_batch(tag)`` per batch that came through (a
        batch of an attempt that later fails is counted too: use it for progress, not results).
        Returns timing figures: ``first_batch_s`` (actors placed and layers loaded) and
        ``steady_wall_s`` (from the first batch back to the end), and ``retries`` (attempts re-run).

        ``items`` is read lazily and the pool keeps only the items in flight or waiting for a retry,
        so a generator of a million items costs the driver no more memory than ten."""
        import ray

        source = iter(items)
        todo: deque = deque()      # (item, attempt) to re-run first; new items come from source
        more = True
        finishing: dict[Any, tuple[str, int]] = {}
        pending_finish: dict[tuple[str, int], list] = {}
        dead: set[tuple[str, int]] = set()
        by_key: dict[str, Item] = {}   # items started and not yet done (the retry needs the item)
        owner: dict[tuple[str, int], _Pipe] = {}   # the pipeline an attempt runs on
        retries = 0

        def fail(key: str, attempt: int, err: BaseException) -> None:
            nonlocal retries
            if (key, attempt) in dead or key not in by_key:
                return   # already re-run, or the item finished: a late error must not run it twice
            dead.add((key, attempt))
            if attempt + 1 >= self.max_attempts:
                raise SaerayError(f"{self.name}: item {key} failed {attempt + 1} times; last error: {err}") from err
            log.warning(f"{self.name}: item {key} attempt {attempt} failed ({type(err).__name__}: "
                        f"{str(err)[:200]}); retrying")
            pipe = owner.pop((key, attempt), None)
            if _actor_trouble(err) and pipe is not None and pipe.probe is None:
                # a restarted actor reloads its layers; sending it work before it answers again would
                # fail at once and use up every attempt. Only this pipeline waits: the others go on.
                pipe.probe_deadline = time.monotonic() + RECOVERY_TIMEOUT_S
                _start_probe(pipe)
            retries += 1
            todo.appendleft((by_key[key], attempt + 1))
            for pipe in self.pipes:
                if pipe.cur is not None and pipe.cur[:2] == (key, attempt):
                    pipe.cur = None

        def take() -> tuple[Item, int] | None:
            nonlocal more
            if todo:
                return todo.popleft()
            if more:
                it = next(source, None)
                if it is not None:
                    return it, 0
                more = False
            return None

        t0 = time.perf_counter()
        t_first = None
        batches_done = 0
        while more or todo or any(p.inflight or p.cur for p in self.pipes) or finishing:
            for pipe in self.pipes:
                if pipe.probe is not None:
                    if time.monotonic() > pipe.probe_deadline:
                        raise SaerayError(f"{self.name}: model actors did not come back within "
                                          f"{RECOVERY_TIMEOUT_S:.0f} s")
                    if not pipe.probe and time.monotonic() >= pipe.probe_at:
                        _start_probe(pipe)   # ask the restarting actors again
                while pipe.probe is None and len(pipe.inflight) < self.max_in_flight:
                    if pipe.cur is None:
                        nxt_item = take()
                        if nxt_item is None:
                            break
                        it, att = nxt_item
                        by_key[it.key] = it
                        owner[(it.key, att)] = pipe
                        for a in pipe.actors:
                            a.begin.remote(it.key, att)
                        pipe.cur = (it.key, att, iter(it.batches()))
                    key, att, batches = pipe.cur
                    nxt = next(batches, None)
                    if nxt is None:
                        refs = [a.finish.remote(key, att) for a in pipe.actors]
                        pending_finish[(key, att)] = refs
                        for r in refs:
                            finishing[r] = (key, att)
                        pipe.cur = None
                        continue
                    x, payload, tag = nxt
                    for a in pipe.actors:
                        x = a.forward.remote(key, att, x, payload)
                    pipe.inflight.append((key, att, x, tag))
            probes = {r: p for p in self.pipes for r in (p.probe or ())}
            waiting = [e[2] for p in self.pipes for e in p.inflight] + list(finishing) + list(probes)
            if not waiting:
                time.sleep(0.05)   # only recovering pipelines between probes: nothing to wait on
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            if not ready:
                continue
            r = ready[0]
            if r in probes:
                _probe_answered(probes[r], r, self.name)
                continue
            if r in finishing:
                key, att = finishing.pop(r)
                refs = pending_finish.get((key, att), [])
                if all(x not in finishing for x in refs):
                    pending_finish.pop((key, att), None)
                    if (key, att) in dead:
                        continue
                    try:
                        parts = ray.get(refs)
                    except Exception as e:  # noqa: BLE001 - any actor failure means: re-run the item
                        fail(key, att, e)
                        continue
                    by_key.pop(key, None)
                    owner.pop((key, att), None)
                    on_item(key, parts)
                continue
            for pipe in self.pipes:
                for i, (key, att, ref, tag) in enumerate(pipe.inflight):
                    if ref == r:
                        del pipe.inflight[i]
                        if (key, att) not in dead:
                            try:
                                ray.get(ref)
                                batches_done += 1
                                if t_first is None:   # steady state starts: actors up, layers loaded
                                    t_first = time.perf_counter()
                                if on_batch is not None:
                                    on_batch(tag)
                            except Exception as e:  # noqa: BLE001
                                fail(key, att, e)
                        break
                else:
                    continue
                break
        t_end = time.perf_counter()
        out = {"loop_wall_s": round(t_end - t0, 3), "batches": batches_done, "retries": retries}
        if t_first is not None:
            out["first_batch_s"] = round(t_first - t0, 3)
            out["steady_wall_s"] = round(t_end - t_first, 3)
        return out


def _start_probe(pipe: _Pipe) -> None:
    pipe.probe = [a.pid.remote() for a in pipe.actors]


def _probe_answered(pipe: _Pipe, ref, what: str) -> None:
    """One actor of a recovering pipeline answered (or failed to): the pipeline is healthy again
    once every actor has answered; "unavailable" (still restarting) asks again half a second later
    (the run loop does, and ends the run at the deadline); an actor gone for good ends it at once."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    pipe.probe.remove(ref)
    try:
        ray.get(ref)
    except ActorDiedError as e:
        raise SaerayError(f"{what}: a model actor died and could not be restarted: {e}") from e
    except ActorUnavailableError:
        pipe.probe.clear()       # drop the rest of this round; a new one starts at probe_at
        pipe.probe_at = time.monotonic() + 0.5
        return
    if not pipe.probe:
        pipe.probe = None


def _actor_trouble(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) or isinstance(getattr(err, "cause", None), RayActorError)


def _wait_alive(actors: list, what: str) -> None:
    """Block until every actor answers, as long as that takes (actors still being placed or loading
    their layers); fail if one is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    while True:
        try:
            ray.get([a.pid.remote() for a in actors], timeout=60.0)
            return
        except ActorDiedError as e:
            raise SaerayError(f"{what}: a model actor died and could not be restarted: {e}") from e
        except (ActorUnavailableError, GetTimeoutError):
            log.info(f"{what}: still waiting for the model actors to load")
            time.sleep(0.5)

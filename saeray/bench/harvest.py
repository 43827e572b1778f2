"""``saeray bench harvest``: how close harvesting comes to the bare forward pass, and whether the
driver's memory stays flat as the corpus grows.

For each model shape (the storyworld 4-layer GPT-NeoX, d=128; a GPT-2-small-shaped GPT-2, 12
layers, d=768), on the same storyworld contexts:

(a) **forward**: the bare forward pass, in this process, through the same
    :class:`saeray.models.shard.Stage` the shard actor uses (one stage, all layers), no hook points
    captured, ``logits=False`` (the harvest's single stage skips the unembedding too), same batch
    size, context length, dtype and torch threads as the actor. Input is pre-tokenized ids already
    in memory; one warm-up batch is not timed.
(b) **harvest local**: the audit's harvest stage (``run_targets(..., ["harvest"])``) of ``resid_post`` of every layer to a
    local folder, through the spec/run machinery on a local Ray (one shard actor with ``threads``
    CPUs and ``threads`` torch threads). Everything a real harvest does is included: corpus
    generation and tokenization in the driver, batches through the Ray object store, capture,
    float16 conversion, Parquet encoding, sha256, atomic writes and per-unit records.
(c) **harvest S3**: the same into ``s3://`` on a moto server on 127.0.0.1 started here (its CPU
    use competes with the harvest on the same machine, as a real network stack would not).

Tokens are the rows written per hook point (real tokens, BOS and padding dropped); (a) counts the
same tokens over the same batches. Harvest rates are given two ways: *steady* (from the first
batch's return to the end: excludes the actor's process start and model loading, a fixed cost per
run) and *end-to-end* (the whole ``run_harvest`` call). Ratios b/a and c/a use the steady rates;
the end-to-end ratios are printed too.

Both sides run with passive OpenMP waiting and Ray workers at the driver's priority (see
:func:`run_bench`); shard actors on CPU write inline when torch already holds every core.

Memory: the driver's RSS is sampled every 20 ms in a thread during a harvest of N and of 10 N
documents (storyworld model, local store); the target is a 10x corpus peak within 10% of the N
one.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .s3local import moto_server

log = logging.getLogger("saeray")

MODELS = ("storyworld", "gpt2", "smollm2")


@dataclass
class HarvestBenchConfig:
    models: tuple[str, ...] = MODELS
    docs: int = 2048                # storyworld-model corpus (documents = contexts): a steady window of seconds
    gpt2_docs: int = 32             # the GPT-2-small shape (and SmolLM2) cost ~40x more per token on CPU
    batch_size: int = 32
    gpt2_batch_size: int = 4        # several batches even in a short run: the steady rate needs them
    context_len: int = 128
    unit_contexts: int = 256
    threads: int = 2                # torch threads in (a) and in the shard actor (= its num_cpus)
    s3: bool = True
    memory_docs: int = 128          # N for the memory check; 0 skips it
    workdir: str | None = None      # keep models and outputs here (default: a temporary folder, removed)
    hookpoint_kind: str = "resid_post"


# ---- pieces ------------------------------------------------------------------------------------

def prepare_model(kind: str, folder: Path) -> tuple[str, str, dict]:
    """(model path for the spec, description, shape). Random init: the forward cost depends on
    the shape only, and no zoo build or download is needed."""
    from ..models.random_init import GPT2_SMALL, save_random_model
    from ..storyworld.tokenizer import save_tokenizer, vocab_size

    if kind == "storyworld":
        from ..storyworld import zoo

        if zoo.is_built():
            path = str(zoo.resolve("storyworld-4l"))
            return path, "storyworld-4l (trained zoo model)", {"n_layers": 4, "d_model": 128, "n_heads": 4}
        shape = dict(n_layers=4, d_model=128, n_heads=4, d_mlp=512, vocab_size=vocab_size(), n_ctx=128)
        path = folder / "storyworld-4l-random"
        if not (path / "model.safetensors").exists():
            save_random_model(path, "gpt_neox", **shape)
            save_tokenizer(path)
        return str(path), "storyworld-4l shape, GPT-NeoX, random init (zoo not built)", shape
    if kind == "gpt2":
        shape = {k: v for k, v in GPT2_SMALL.items() if k != "family"}
        path = folder / "gpt2-small-random"
        if not (path / "model.safetensors").exists():
            save_random_model(path, "gpt2", **shape)
            save_tokenizer(path)  # storyworld ids are all < GPT-2's vocabulary; one tokenizer for both
        return str(path), "GPT-2 small shape, random init", shape
    if kind == "smollm2":   # the real LLM (docs/models.md), on real English ('python-docs')
        from ..models.smollm2 import materialize

        return str(materialize()), "SmolLM2-135M-Instruct (real weights, Q4_1 dequantized)", \
            {"n_layers": 30, "d_model": 576, "n_heads": 9}
    from ..errors import InputError

    raise InputError(f"--models: unknown model '{kind}'; use {', '.join(MODELS)}")


class RssSampler:
    """Peak resident memory of this process, sampled in a background thread."""

    def __init__(self, every_s: float = 0.02):
        import psutil

        self.proc, self.every_s = psutil.Process(), every_s
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def figures(self) -> dict:
        mb = 2**20
        return {"rss_start_mb": round(self.start / mb, 1), "rss_peak_mb": round(self.peak / mb, 1),
                "rss_growth_mb": round((self.peak - self.start) / mb, 1)}


def make_spec(cfg: HarvestBenchConfig, model: str, store: str, name: str, n_docs: int, n_layers: int,
              batch_size: int | None = None, source: str = "storyworld"):
    import json

    from ..spec import parse_spec

    d = {"name": name, "model": {"name": model, "dtype": "float32"},
         "corpus": {"source": source, "n_docs": n_docs, "context_len": cfg.context_len},
         "hookpoints": [f"{cfg.hookpoint_kind}.{i}" for i in range(n_layers)],
         "harvest": {"batch_size": batch_size or cfg.batch_size, "unit_contexts": cfg.unit_contexts, "stages": 1, "dtype": "float16"},
         "store": store, "resources": {"harvest": {"num_cpus": cfg.threads}}}
    return parse_spec(json.dumps(d))


def forward_rate(spec, threads: int) -> dict:
    """(a): the bare forward over the spec's contexts, pre-tokenized, same batches as the harvest."""
    import torch

    from ..harvest.corpus import Corpus
    from ..modelref import resolve_model
    from ..models.shard import Stage

    ref = resolve_model(spec.models[0])
    ctx = Corpus(spec.corpus, ref.tokenizer()).contexts(0, spec.corpus.n_docs)
    B = spec.harvest.batch_size
    batches = [(torch.from_numpy(ctx.ids[a:a + B]), int(ctx.keep[a:a + B].sum())) for a in range(0, len(ctx), B)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stage = Stage.from_pretrained(ref.path, (0, ref.config().num_hidden_layers), revision=ref.revision,
                                      dtype=ref.dtype)
        with torch.inference_mode():
            stage(batches[0][0], logits=False)  # warm-up: first-call allocations, not timed
            t0 = time.perf_counter()
            for ids, _ in batches:
                stage(ids, logits=False)
            wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    del stage
    gc.collect()
    tokens = sum(n for _, n in batches)
    return {"tokens": tokens, "contexts": len(ctx), "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}


def harvest_rate(spec, threads: int) -> dict:
    """(b)/(c): one real harvest through the audit's own stage runner, driver RSS sampled throughout
    (the shard actor gets ``threads`` CPUs, hence ``threads`` torch threads)."""
    from ..run.audit import open_run, run_targets

    rc = open_run(spec)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        res = run_targets(rc, ["harvest"])[rc.targets[0].id]["harvest"]
        wall = time.perf_counter() - t0
    out = {"rows": res.rows, "bytes": res.bytes, "units": res.units, **res.timing}
    ctx = rc.target(rc.targets[0])
    tokens, nbytes = out["rows"], out["bytes"]
    steady = out.get("steady_tokens_per_s") or tokens / wall
    steady_wall = out.get("steady_wall_s") or wall
    return {"run": ctx.store.url, "rows": tokens, "units": out["units"], "bytes": nbytes,
            "wall_s": round(wall, 3), "startup_s": out.get("first_batch_s"),
            "tokens_per_s": round(steady, 1), "tokens_per_s_e2e": round(tokens / wall, 1),
            "bytes_per_token": round(nbytes / max(tokens, 1), 1),
            # bytes of the batches after the first over the steady wall time (same basis as tokens_per_s)
            "mb_per_s": round(steady * nbytes / max(tokens, 1) / 1e6, 2),
            "mb_per_s_e2e": round(nbytes / wall / 1e6, 2), "steady_wall_s": steady_wall,
            **rss.figures()}


def bench_model(cfg: HarvestBenchConfig, kind: str, work: Path, s3_root: str | None) -> dict:
    """(a) is measured before, between and after (b) and (c), and each ratio uses the mean of the
    two (a) runs around its harvest: on a shared machine the load drifts, and bracketing keeps a
    slow spell from landing on one side of a ratio only."""
    from ..errors import SaerayError

    path, desc, shape = prepare_model(kind, work / "models")
    n_docs = cfg.docs if kind == "storyworld" else cfg.gpt2_docs
    B = cfg.batch_size if kind == "storyworld" else cfg.gpt2_batch_size
    n_layers = shape["n_layers"]
    tag = uuid.uuid4().hex[:6]
    source = "python-docs" if kind == "smollm2" else "storyworld"
    spec_local = make_spec(cfg, path, str(work / "store"), f"bench-{kind}-{tag}", n_docs, n_layers, B, source)
    fwd = []

    def forward() -> dict:
        log.info(f"bench harvest [{kind}]: (a) bare forward, {n_docs} docs, batch {B}")
        fwd.append(forward_rate(spec_local, cfg.threads))
        return fwd[-1]

    forward()
    log.info(f"bench harvest [{kind}]: (b) harvest to a local folder")
    b = harvest_rate(spec_local, cfg.threads)
    forward()
    if b["rows"] != fwd[0]["tokens"]:
        raise SaerayError(f"bench harvest [{kind}]: harvest wrote {b['rows']} rows, forward saw {fwd[0]['tokens']} tokens")
    a_b = sum(f["tokens_per_s"] for f in fwd[:2]) / 2
    row = {"model": desc, "shape": shape, "docs": n_docs, "batch_size": B, "context_len": cfg.context_len,
           "hookpoints": n_layers, "local": b,
           "b_over_a": round(b["tokens_per_s"] / a_b, 3), "b_over_a_e2e": round(b["tokens_per_s_e2e"] / a_b, 3)}
    if s3_root is not None:
        log.info(f"bench harvest [{kind}]: (c) harvest to S3 (moto)")
        spec_s3 = make_spec(cfg, path, s3_root, f"bench-{kind}-{tag}", n_docs, n_layers, B, source)
        c = harvest_rate(spec_s3, cfg.threads)
        forward()
        a_c = sum(f["tokens_per_s"] for f in fwd[1:3]) / 2
        row.update({"s3": c, "c_over_a": round(c["tokens_per_s"] / a_c, 3),
                    "c_over_a_e2e": round(c["tokens_per_s_e2e"] / a_c, 3)})
    rates = [f["tokens_per_s"] for f in fwd]
    row["forward"] = {"tokens": fwd[0]["tokens"], "contexts": fwd[0]["contexts"],
                      "tokens_per_s": round(sum(rates) / len(rates), 1), "runs_tokens_per_s": rates}
    return row


def bench_memory(cfg: HarvestBenchConfig, work: Path) -> dict:
    """Driver RSS during a harvest of N and of 10 N documents (storyworld shape, local store)."""
    path, _, shape = prepare_model("storyworld", work / "models")
    out = {}
    for label, n in (("n", cfg.memory_docs), ("10n", 10 * cfg.memory_docs)):
        spec = make_spec(cfg, path, str(work / "store"), f"bench-mem-{label}-{uuid.uuid4().hex[:6]}", n,
                         shape["n_layers"])
        log.info(f"bench harvest [memory]: {n} docs")
        r = harvest_rate(spec, cfg.threads)
        out[label] = {"docs": n, "rows": r["rows"], "units": r["units"], "rss_start_mb": r["rss_start_mb"],
                      "rss_peak_mb": r["rss_peak_mb"], "rss_growth_mb": r["rss_growth_mb"], "wall_s": r["wall_s"]}
    out["peak_ratio"] = round(out["10n"]["rss_peak_mb"] / out["n"]["rss_peak_mb"], 3)
    out["flat"] = out["peak_ratio"] <= 1.10
    return out


def run_bench(cfg: HarvestBenchConfig, address: str | None = None) -> dict:
    import platform

    from ..raycluster import connect

    # Same CPU conditions for (a) in this process and (b)/(c) in Ray workers, which inherit the
    # local-Ray environment (worker niceness 0, passive OpenMP waiting) when Ray starts below.
    from ..raycluster import local_env

    local_env()
    own = cfg.workdir is None
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="saeray-bench-harvest-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with (moto_server() if cfg.s3 else _null()) as endpoint:
            s3_root = None
            if endpoint is not None:
                import boto3

                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
                s3_root = f"s3://{bucket}/runs"
            # after the S3 environment is exported: every Ray worker inherits it
            connect(address, num_cpus=max(cfg.threads, os.cpu_count() or 1))
            # memory first: before any forward-pass model has passed through the driver's heap
            memory = bench_memory(cfg, work) if cfg.memory_docs > 0 else None
            models = {kind: bench_model(cfg, kind, work, s3_root) for kind in cfg.models}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    return {
        "bench": "harvest",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "RAY_worker_niceness")},
        "included": {
            "forward": "Stage forward only (no capture, no logits) on pre-tokenized ids in memory; same batch size, "
                       "context length, dtype and torch threads as the shard actor; one warm-up batch untimed",
            "harvest": "the audit's harvest stage: spec checks, corpus contexts (storyworld generation or the tokenized "
                       "text), the model pool (placement group, Ray object store), capture, float16, Parquet "
                       "(saeray.harvest.parquet_encode), sha256, atomic writes, per-unit records; tokens_per_s is steady "
                       "state (after the first batch returned), tokens_per_s_e2e the whole call incl. actor start and model load",
        },
        "config": {k: v for k, v in asdict(cfg).items() if k != "workdir"},
        "models": models,
        "memory": memory,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


@contextmanager
def _null() -> Iterator[None]:
    yield None


def render(res: dict) -> str:
    """Human-readable table of :func:`run_bench`'s result."""
    lines = [f"harvest benchmark ({res['machine']}); tokens/s = rows written per hook point per second"]
    hdr = f"{'model':<52} {'(a) fwd':>9} {'(b) local':>10} {'(c) s3':>9} {'b/a':>6} {'c/a':>6} {'B/tok':>7} {'MB/s b':>7} {'MB/s c':>7} {'RSS MB':>7}"
    lines.append(hdr)
    for r in res["models"].values():
        c = r.get("s3", {})
        rss = max(r["local"]["rss_peak_mb"], c.get("rss_peak_mb", 0))
        lines.append(f"{r['model'][:52]:<52} {r['forward']['tokens_per_s']:>9.0f} {r['local']['tokens_per_s']:>10.0f} "
                     f"{c.get('tokens_per_s', float('nan')):>9.0f} {r['b_over_a']:>6.2f} {r.get('c_over_a', float('nan')):>6.2f} "
                     f"{r['local']['bytes_per_token']:>7.0f} {r['local']['mb_per_s']:>7.1f} {c.get('mb_per_s', float('nan')):>7.1f} {rss:>7.0f}")
        lines.append(f"{'':<52} end-to-end (incl. actor start, model load): b {r['local']['tokens_per_s_e2e']:.0f} tok/s "
                     f"(b/a {r['b_over_a_e2e']:.2f}), startup {r['local']['startup_s']} s"
                     + (f"; c {c['tokens_per_s_e2e']:.0f} tok/s (c/a {r['c_over_a_e2e']:.2f})" if c else ""))
    lines.append("targets: b/a >= 0.8: " + ", ".join(f"{k} {'met' if r['b_over_a'] >= 0.8 else 'NOT met'}"
                                                     for k, r in res["models"].items()))
    m = res.get("memory")
    if m:
        lines.append(f"driver RSS: {m['n']['docs']} docs peak {m['n']['rss_peak_mb']:.0f} MB (growth {m['n']['rss_growth_mb']:.0f}); "
                     f"{m['10n']['docs']} docs peak {m['10n']['rss_peak_mb']:.0f} MB (growth {m['10n']['rss_growth_mb']:.0f}); "
                     f"ratio {m['peak_ratio']:.3f} -> {'flat (within 10%)' if m['flat'] else 'NOT flat'}")
    lines.append(f"total {res['wall_s']} s")
    return "\n".join(lines)

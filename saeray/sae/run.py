"""The one way saeray trains SAEs on stored activations. ``saeray train`` (:func:`train_on_activations`)
and the audit's training units (:func:`saeray.train.unit.train_unit`) both call
:func:`fit_dataset`, so the same activations, variants and settings give the same SAE bit for bit
(tests/test_sae_train.py checks it): the schedule (:meth:`TrainConfig.for_run`), each
architecture's learning rate (:meth:`saeray.sae.base.SAE.default_lr`) and run-length-dependent
settings (:meth:`saeray.sae.base.SAE.configure_for_run`, e.g. GBA's controller) are resolved in
one place.

Layout of ``saeray train``'s ``out``: the SAELens folder (cfg.json, sae_weights.safetensors,
saeray.json) and ``checkpoint/checkpoint.pt`` (our resumable trainer state; kept so a re-run
returns at once).
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch

from ..errors import InputError
from ..harvest.reader import ActivationDataset
from ..store import Store
from . import io
from .metrics import evaluate
from .train import TrainConfig, Variant, _take_rows, dist_rank_world, fit, skip_rows


def dataset_batches(ds: ActivationDataset, tokens: int):
    """``batches(skip)`` over ``tokens`` rows of ``ds`` (several epochs if needed); whole epochs
    are skipped without reading, the rest by dropping rows, so resume sees the identical stream."""
    rows = ds.num_rows

    def gen(skip: int = 0):
        e0 = skip // rows
        return skip_rows(ds.batches(tokens=tokens - e0 * rows, start_epoch=e0), skip - e0 * rows)
    return gen


def rank_slices(batches, rank: int, world: int):
    """``batches(skip)`` of this rank's slice of every global batch; ``skip`` counts local rows."""
    def gen(skip: int = 0):
        for b in batches(skip * world):
            n = len(b) // world
            yield b[rank * n:(rank + 1) * n]
    return gen


def fit_dataset(ds: ActivationDataset, variants: list[Variant], tokens: int, batch_size: int,
                lr: float | None = None, seed: int = 0, device: str = "cpu", checkpoint_every: int = 500,
                ckpt=None, on_step=None, progress_desc: str = "train SAEs", warm: dict[str, str] | None = None):
    """Train ``variants`` on ``tokens`` rows of ``ds``; returns (fit's results, the TrainConfig).
    Inside a torch.distributed group every rank reads the same global stream and trains on its
    slice of each batch, so step count, schedule and resume points are those of one process."""
    rank, world = dist_rank_world()
    if batch_size % world:
        raise InputError(f"batch_size {batch_size} must be a multiple of the data-parallel workers {world}")
    tcfg = TrainConfig.for_run(tokens, batch_size, lr=lr, seed=seed, device=device,
                               checkpoint_every=checkpoint_every)
    stream = dataset_batches(ds, tokens)
    if world > 1:  # per-rank rows; schedule and dead window stay those of the global run
        steps = math.ceil(tokens / batch_size)
        tcfg = replace(tcfg, tokens=steps * batch_size // world, batch_size=batch_size // world)
    res = fit(rank_slices(stream, rank, world) if world > 1 else stream, ds.d, variants, tcfg, ckpt=ckpt,
              on_step=on_step, init_batches=stream, progress_desc=progress_desc, warm=warm)
    return res, tcfg


def shuffled_sample(ds: ActivationDataset, rows: int):
    """Up to ``rows`` rows of ``ds`` in another shuffle (seed + 1) than training's: the quick
    metrics both training entry points record (no held-out split exists in stored activations)."""
    other = replace(ds, seed=ds.seed + 1)
    return _take_rows(other.batches(tokens=min(rows, ds.num_rows)), rows)


def sample_metrics(sae, ds_sample) -> dict:
    ev = evaluate(sae, ds_sample)
    ev.pop("freq")
    return ev


def training_info(tcfg: TrainConfig, variant: Variant, last: dict) -> dict:
    return {"config": {**asdict(tcfg), "adam_betas": list(tcfg.adam_betas)}, "variant": asdict(variant),
            "last_batch": last}


def train_on_activations(activations: str, arch: str, width: int, out: str, k: int | None = None,
                         l1: float | None = None, tokens: int | None = None, batch_size: int = 1024,
                         lr: float | None = None, seed: int = 0, device: str | None = None,
                         checkpoint_every: int = 500, shuffle_buffer: int = 1 << 16,
                         eval_tokens: int = 16_384, opts: dict | None = None) -> dict:
    if width < 1:
        raise InputError(f"--width {width} must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .registry import build

    opts = dict(opts or {})
    build(arch, 1, width, k=k, l1=l1, **opts)   # its checks (k <= width, the knobs each arch takes) before any I/O
    ds = ActivationDataset(activations, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed)
    tokens = tokens or ds.num_rows
    variant = Variant(arch, width, k=k, l1=l1, opts=opts)
    out_store = Store.open(out)
    out_store.check_writable()   # before the data is read: a bad --out fails now, not at the first checkpoint
    res, cfg = fit_dataset(ds, [variant], tokens, batch_size, lr=lr, seed=seed, device=device,
                           checkpoint_every=checkpoint_every, ckpt=out_store / "checkpoint",
                           progress_desc=f"train {variant.name}")
    sae, train_metrics = res[variant.name]
    ev = sample_metrics(sae, shuffled_sample(ds, eval_tokens))
    ev["dead_frac_train_window"] = float(sae.dead_mask().float().mean())
    info = {"training": training_info(cfg, variant, train_metrics),
            "metrics": ev, "provenance": {"activations": activations, "files": len(ds.files), "rows": ds.num_rows,
                                          "meta": ds.meta}}
    url = io.save(sae, out_store, info=info, hook_name=ds.meta.get("hookpoint"), model_name=ds.meta.get("model"))
    return {"out": url, "arch": arch, "name": variant.name, "tokens": tokens, "metrics": ev,
            "tokens_per_s": train_metrics.get("tokens_per_s")}

"""``saeray train``: one SAE on a Parquet activation dataset (a harvested hook point or any folder of
Parquet files with a fixed-size-list ``act`` column), checkpointed and resumable at ``out``.

Layout under ``out``: the SAELens folder (cfg.json, sae_weights.safetensors, saeray.json) and
``checkpoint/checkpoint.pt`` (our resumable trainer state; kept so a re-run returns at once).
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..harvest.reader import ActivationDataset
from ..store import Store
from . import io
from .metrics import evaluate
from .train import TrainConfig, Variant, _take_rows, fit, skip_rows


def dataset_batches(ds: ActivationDataset, tokens: int):
    """``batches(skip)`` over ``tokens`` rows of ``ds`` (several epochs if needed); whole epochs
    are skipped without reading, the rest by dropping rows, so resume sees the identical stream."""
    rows = ds.num_rows

    def gen(skip: int = 0):
        e0 = skip // rows
        return skip_rows(ds.batches(tokens=tokens - e0 * rows, start_epoch=e0), skip - e0 * rows)
    return gen


def train_on_activations(activations: str, arch: str, width: int, out: str, k: int | None = None,
                         l1: float | None = None, tokens: int | None = None, batch_size: int = 1024,
                         lr: float = 1e-3, seed: int = 0, device: str | None = None,
                         checkpoint_every: int = 500, shuffle_buffer: int = 1 << 16,
                         eval_tokens: int = 16_384) -> dict:
    if width < 1:
        raise InputError(f"--width {width} must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds = ActivationDataset(activations, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed)
    tokens = tokens or ds.num_rows
    variant = Variant(arch, width, k=k, l1=l1)
    cfg = TrainConfig.for_run(tokens, batch_size, lr=lr, seed=seed, device=device, checkpoint_every=checkpoint_every)
    out_store = Store.open(out)
    res = fit(dataset_batches(ds, tokens), ds.d, [variant], cfg, ckpt=out_store / "checkpoint",
              progress_desc=f"train {variant.name}")
    sae, train_metrics = res[variant.name]
    # metrics on a differently shuffled sample of the same data (no held-out split exists here)
    ev_ds = ActivationDataset(activations, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed + 1)
    ev = evaluate(sae, _take_rows(ev_ds.batches(tokens=min(eval_tokens, ds.num_rows)), eval_tokens))
    ev.pop("freq")
    ev["dead_frac_train_window"] = float(sae.dead_mask().float().mean())
    info = {"training": {"config": {**cfg.__dict__, "adam_betas": list(cfg.adam_betas)}, "variant": variant.__dict__,
                         "last_batch": train_metrics},
            "metrics": ev, "provenance": {"activations": activations, "files": len(ds.files), "rows": ds.num_rows,
                                          "meta": ds.meta}}
    url = io.save(sae, out_store, info=info, hook_name=ds.meta.get("hookpoint"), model_name=ds.meta.get("model"))
    return {"out": url, "arch": arch, "name": variant.name, "tokens": tokens, "metrics": ev,
            "tokens_per_s": train_metrics.get("tokens_per_s")}

"""One training unit = one hook point: every requested SAE variant of that hook point trained on
one shared stream of its harvested activations, read once from the store.

A plain function (:func:`train_unit`), testable without Ray; :mod:`saeray.train.launch` runs it as
the loop of a Ray Train ``TorchTrainer``. Layout in the target's folder::

    saes/<hookpoint>/_checkpoint/checkpoint.pt   resumable state of all variants (MultiTrainer)
    saes/<hookpoint>/<variant>/                  final SAEs, SAELens layout + saeray.json

Resume: the checkpoint holds model, optimiser, schedule, RNG and the token count; the activation
stream is a pure function of (seed, epoch), so a restarted worker skips exactly the rows it had
consumed and finishes with the same weights an uninterrupted run produces.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

log = logging.getLogger("saeray")

CKPT_DIR = "_checkpoint"
RESULT = "result.json"       # the unit's results, next to its checkpoint


@dataclass
class UnitConfig:
    run_url: str                      # the target's folder (<run>/targets/<model>@<revision>)
    store_options: dict               # Store options (may hold resolved secrets: never logged)
    hookpoint: str
    variants: list[dict]              # saeray.sae.train.Variant fields
    tokens: int
    batch_size: int = 1024
    lr: float | None = None           # None: each architecture's default (SAE.default_lr)
    seed: int = 0
    checkpoint_every: int = 500
    epochs_max: int = 100
    workers: int = 1                  # data-parallel ranks (Ray Train workers) for this unit
    shuffle_buffer: int = 1 << 16
    device: str = "auto"
    threads: int | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict)
    warm: dict | None = None          # {variant name: SAE folder URL} to start from (warm start)

    def to_dict(self) -> dict:
        return asdict(self)


def variant_name(v) -> str:
    from ..sae.train import Variant

    return Variant(**v).name if isinstance(v, dict) else v.name


def variants_from_spec(sae_spec) -> list[dict]:
    out = []
    for a in sae_spec.architectures:
        v = {"arch": a.arch, "width": a.width, "k": a.k, "l1": a.l1}
        if a.opts():
            v["opts"] = a.opts()
        out.append(v)
    names = [variant_name(v) for v in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        from ..errors import InputError

        raise InputError(f"sae.architectures: variants {sorted(dup)} appear twice; each (arch, width, k, l1, htf, "
                         "ltf, k_aux) must be unique")
    return out


def sae_rel(hookpoint: str, name: str) -> str:
    return f"saes/{hookpoint}/{name}"


def train_unit(cfg: UnitConfig, on_step=None) -> dict:
    """Train all variants of ``cfg.hookpoint``; returns {variant name: {"path", "metrics"}}."""
    import torch

    from ..harvest.reader import ActivationDataset
    from ..sae import io
    from ..sae.run import fit_dataset, sample_metrics, shuffled_sample, training_info
    from ..sae.train import Variant, dist_rank_world
    from ..store import Store

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    run = Store(cfg.run_url, cfg.store_options)
    ds = ActivationDataset.from_target(run, cfg.hookpoint, batch_size=cfg.batch_size,
                                    shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
    tokens = min(cfg.tokens, cfg.epochs_max * ds.num_rows)
    variants = [Variant(**v) for v in cfg.variants]
    res, tcfg = fit_dataset(ds, variants, tokens, cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=device,
                            checkpoint_every=cfg.checkpoint_every, ckpt=run / "saes" / cfg.hookpoint / CKPT_DIR,
                            on_step=on_step, progress_desc=f"train {cfg.hookpoint}", warm=cfg.warm)
    if dist_rank_world()[0] != 0:  # every rank holds the same SAEs; rank 0 writes them
        return {}
    # quick metrics on a differently shuffled sample of the training data; the evaluate stage
    # measures held-out tokens inside the model
    sample = shuffled_sample(ds, 16_384)
    out = {}
    for v in variants:
        sae, last = res[v.name]
        ev = sample_metrics(sae.cpu() if device != "cpu" else sae, sample)
        info = {"training": training_info(tcfg, v, last),
                "metrics_train_sample": ev,
                "provenance": {"run": cfg.run_url, "hookpoint": cfg.hookpoint, "rows": ds.num_rows,
                               "files": len(ds.files), "meta": ds.meta}}
        url = io.save(sae, run / sae_rel(cfg.hookpoint, v.name), info=info, hook_name=cfg.hookpoint,
                      model_name=cfg.model or ds.meta.get("model"))
        out[v.name] = {"path": sae_rel(cfg.hookpoint, v.name), "url": url, "arch": v.arch, "width": v.width, "k": v.k, "l1": v.l1,
                       **({"opts": v.opts} if v.opts else {}),
                       "tokens": tokens, "tokens_per_s": last.get("tokens_per_s"),
                       "train_sample": {k: ev[k] for k in ("fvu", "l0", "mse", "dead_frac", "dense_frac")}}
    run.write_json(f"saes/{cfg.hookpoint}/{CKPT_DIR}/{RESULT}", out)
    return out

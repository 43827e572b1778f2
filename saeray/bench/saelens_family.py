"""The body of ``saeray bench saelens-family``; runs INSIDE the benchmark virtualenv that has sae-lens
(:mod:`saeray.bench.saelens_env`), as ``python -m saeray.bench.saelens_family ...``.

SAELens's own TopK and BatchTopK beside saeray's, on the planted settings of ``saeray bench recovery
--family`` (``recovery_family.FAMILY``): is a family result a property of the method or of saeray's
code? Per setting, one seed:

* data: the family's stream (``Setting.planted()``, batches of 1024 in the family's order) and its
  20k held-out rows; ``--tokens`` rows per SAE (default the family's 3M);
* k: the family's rules, ``topk_k`` (ceil 1.5 × true L0) for both TopKs and ``batchtopk_k`` (the
  true L0) for both BatchTopKs; width: the setting's;
* saeray: ``fit`` with its defaults, both variants in one ``fit``, as the family bench trains them;
* SAELens: ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` with every config field at SAELens's
  default, trained by ``sae_lens.synthetic.train_toy_sae`` with its defaults (Adam lr 3e-4 unless
  ``--lr``); the helper draws each batch as ``feature_dict(activations_generator(batch_size))``, and
  a streaming generator plus an identity dictionary hand it the family's batches instead;
* scoring: the family's ``_score`` on the decoder rows and the held-out codes (FRR at cosine 0.9 /
  0.8, mean best cosine, MCC, L0, dead fraction).

Prints a table, writes ``result.json`` under ``--out``; with ``--json`` the last stdout line is the
result as one JSON object.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from ..errors import InputError
from .recovery_family import Setting, _score, batchtopk_k, pick_settings, topk_k
from .saelens_side import _Identity

BATCH = 1024
SCORES = ("frr90", "frr80", "mean_best_cos", "mcc", "l0", "dead_frac")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelens_family", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="", help="comma list of family settings (default: all)")
    p.add_argument("--tokens", type=int, default=3_000_000, help="training rows per SAE (rounded to whole batches)")
    p.add_argument("--lr", type=float, default=None, help="SAELens's learning rate (default: train_toy_sae's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--json", action="store_true")
    return p


class _Stream:
    """Stands in for ActivationGenerator inside train_toy_sae: hands out the family's batches in order
    (already the hidden activations; the dictionary is the identity)."""

    def __init__(self, batches):
        self.it, self.rows = iter(batches), 0

    def __call__(self, n: int) -> torch.Tensor:
        b = next(self.it)
        if len(b) != n:
            raise RuntimeError(f"SAELens asked for {n} rows; the family's batches hold {len(b)}")
        self.rows += n
        return torch.as_tensor(b, dtype=torch.float32)


def _default_lr() -> float:
    from sae_lens.synthetic import train_toy_sae

    return float(inspect.signature(train_toy_sae).parameters["lr"].default)


def run_setting(s: Setting, tokens: int, lr: float) -> list[dict]:
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.synthetic import train_toy_sae

    from ..sae.train import TrainConfig, Variant, fit

    pf = s.planted()
    width, l0 = s.width, pf.expected_l0()
    ks = {"topk": topk_k(l0), "batchtopk": batchtopk_k(l0)}
    x_eval, h_eval = s.eval_rows(pf)
    xt = torch.as_tensor(x_eval)
    rows = []

    def row(name: str, arch: str, dirs, z, row_lr: float, **timing) -> dict:
        sc = _score(np.asarray(dirs, dtype=np.float64), z, pf.V, h_eval)
        return {"setting": s.name, "name": name, "arch": arch, "k": ks[arch], "lr": row_lr, **timing,
                **{k: float(sc[k]) for k in SCORES}}

    t0 = time.perf_counter()
    variants = [Variant(a, width, k=ks[a], seed=0, name=f"saeray-{a}") for a in ks]
    res = fit(pf.batches(BATCH, tokens), pf.d, variants, TrainConfig.for_run(tokens, BATCH, checkpoint_every=0,
                                                                            log_every=1000))
    fit_s = time.perf_counter() - t0
    for v in variants:
        sae, m = res[v.name]
        with torch.no_grad():
            z = sae.encode(xt).float().numpy()
        rows.append(row(v.name, v.arch, sae.directions().numpy(), z, m["lr"], fit_s=fit_s))  # both variants' one fit

    cls = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
           "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}
    for arch, (sae_cls, cfg_cls) in cls.items():
        torch.manual_seed(0)
        sae = sae_cls(cfg_cls(d_in=pf.d, d_sae=width, k=ks[arch]))
        stream = _Stream(pf.batches(BATCH, tokens)())
        t1 = time.perf_counter()
        train_toy_sae(sae, _Identity(torch.zeros(1, pf.d)), stream, training_samples=tokens, batch_size=BATCH, lr=lr)
        dt = time.perf_counter() - t1
        if stream.rows != tokens:
            raise RuntimeError(f"SAELens trained on {stream.rows} rows, not {tokens}")
        with torch.no_grad():
            z = sae.encode(xt).float().numpy()
        rows.append(row(f"saelens-{arch}", arch, sae.W_dec.detach().numpy(), z, lr, train_s=dt))
    return rows


def format_table(res: dict) -> str:
    hdr = f"{'setting':<18} {'SAE':<17} {'k':>5} {'FRR@0.9':>8} {'FRR@0.8':>8} {'best cos':>8} {'MCC':>6} {'L0':>6} {'dead %':>7}"
    lines = [f"SAELens {res['versions']['sae_lens']} beside saeray on the recovery family: {res['tokens']:,} tokens "
             f"per SAE, one seed; SAELens lr {res['saelens_lr']:g}", hdr, "-" * len(hdr)]
    for r in res["rows"]:
        lines.append(f"{r['setting']:<18} {r['name']:<17} {r['k']:>5.3g} {r['frr90']:>8.3f} {r['frr80']:>8.3f} "
                     f"{r['mean_best_cos']:>8.3f} {r['mcc']:>6.3f} {r['l0']:>6.2f} {100 * r['dead_frac']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sae_lens

    a = _parser().parse_args(argv)
    try:
        settings = pick_settings(a.settings)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    tokens = max(1, round(a.tokens / BATCH)) * BATCH
    lr = a.lr if a.lr is not None else _default_lr()
    t0 = time.perf_counter()
    rows = []
    for s in settings:
        print(f"setting {s.name}: saeray and SAELens TopK, BatchTopK on {tokens:,} rows", file=sys.stderr, flush=True)
        rows += run_setting(s, tokens, lr)
    res = {"bench": "saelens-family", "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__},
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads},
           "tokens": tokens, "batch_size": BATCH, "saelens_lr": lr, "settings": [s.name for s in settings],
           "rows": rows, "wall_s": time.perf_counter() - t0, "out": os.path.abspath(a.out)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

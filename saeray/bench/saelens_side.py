"""The body of ``saeray bench saelens``; runs INSIDE the benchmark virtualenv that has sae-lens
(:mod:`saeray.bench.saelens_env`), as ``python -m saeray.bench.saelens_side ...``.

One data stream, SAELens's own synthetic suite on both sides:

* data: ``sae_lens.synthetic.SyntheticModel`` built from ``SyntheticModelConfig(num_features,
  hidden_dim, seed)`` with every other field at SAELens's default (Zipfian firing probabilities
  exponent 1, 0.3 .. 0.01; magnitude 1, no spread; bias of norm 1; no hierarchy, correlation or
  orthogonalisation). ``tokens`` rows are sampled once (seeded) and kept in memory; every SAE trains
  on exactly these rows in the same order and batch size, so both sides see the same stream and
  data generation is outside every timing.
* SAELens: ``TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))`` (other fields default),
  trained by ``sae_lens.synthetic.train_toy_sae`` with its defaults (Adam lr 3e-4 constant, no
  warm-up, grad clip 1, dead window 1000 steps). The helper draws each batch as
  ``feature_dict(activations_generator(batch_size))``; a replaying generator plus an identity
  dictionary hand it the pre-generated rows instead (the helper itself is unchanged).
* saeray: ``saeray.sae.train.fit`` with ``TrainConfig.for_run(tokens, batch_size)`` and
  ``Variant(arch, width, k=...)`` (or ``l1=`` for relu/gated/jumprelu: DEFAULT_L1 in
  saelens_env; ``--htf/--ltf`` set GBA's target range, and its row is then named by them), one
  ``fit`` per architecture so that each tokens/s is one SAE's. Saved with ``saeray.sae.io.save``
  and loaded back with SAELens's ``SAE.load_from_disk``; on 4,096 rows the loaded SAE's latents
  and reconstruction are compared with saeray's module (``roundtrip``).
* k defaults to the data's expected L0: rounded for both TopKs, as is for BatchTopK (its k is a
  mean per token, docs/training.md); width to num_features.
* scoring: SAELens's ``eval_sae_on_synthetic_data`` on every SAE (SAELens's too, after its own
  ``save_inference_model`` / ``SAE.load_from_disk`` round trip), on the same held-out sample (the
  generator is reseeded before each call).

Prints a table, writes ``result.json`` and one folder per SAE under ``--out``; with ``--json`` the
last stdout line is the result as one JSON object.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import sys
import time

import torch

from .saelens_env import ARCHS, parse_l1

EVAL_SEED, TRAIN_SEED = 1_000_003, 12_345


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelens_side", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--features", type=int, default=256, help="ground-truth features (num_features)")
    p.add_argument("--dim", type=int, default=64, help="hidden_dim of the synthetic model")
    p.add_argument("--width", type=int, default=None, help="SAE latents (default: = features)")
    p.add_argument("--k", type=int, default=None, help="TopK/BatchTopK k (default: the data's true L0, rounded)")
    p.add_argument("--tokens", type=int, default=4_000_000, help="training rows per SAE (rounded to whole batches)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--archs", default=",".join(ARCHS), help="saeray architectures, comma list")
    p.add_argument("--l1", default="", help="ARCH=VALUE,... for relu, gated, jumprelu (default: saeray's recovery-bench values)")
    p.add_argument("--htf", type=float, default=None, help="GBA's highest target frequency (default: GBA's own)")
    p.add_argument("--ltf", type=float, default=None, help="GBA's lowest target frequency (default: GBA's own)")
    p.add_argument("--no-saelens", action="store_true", help="skip the SAELens TopK (debugging)")
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--seed", type=int, default=0, help="synthetic model seed")
    p.add_argument("--json", action="store_true")
    return p


class _Replay:
    """Stands in for ActivationGenerator inside train_toy_sae: returns the next rows of the
    pre-generated stream (already hidden activations; the dictionary below is the identity)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.i = x, 0

    def __call__(self, n: int) -> torch.Tensor:
        b = self.x[self.i:self.i + n]
        if len(b) < n:
            raise RuntimeError(f"SAELens trainer asked for more than the {len(self.x)} pre-generated rows")
        self.i += n
        return b

    def sample(self, n: int) -> torch.Tensor:
        return self(n)


class _Identity(torch.nn.Module):
    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.feature_vectors = torch.nn.Parameter(like.detach().clone(), requires_grad=False)  # device probe only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _eval(sae, model, n: int, batch: int) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    torch.manual_seed(EVAL_SEED)   # every SAE is scored on the same held-out rows
    r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                   num_samples=n, batch_size=batch).to_dict()
    c = r.pop("classification")
    return {**r, "precision": c["precision"], "recall": c["recall"], "f1": c["f1_score"]}


def run(a: argparse.Namespace) -> dict:
    import numpy as np
    import sae_lens
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, train_toy_sae

    from ..sae import io as sio
    from ..sae.registry import given_opts
    from ..sae.train import TrainConfig, Variant, fit, opts_suffix
    from .recovery_family import batchtopk_k

    torch.set_num_threads(a.threads)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    archs = [s.strip() for s in a.archs.split(",") if s.strip()]
    bad = [s for s in archs if s not in ARCHS]
    if bad:
        raise SystemExit(f"--archs: unknown {bad}; use a comma list of {', '.join(ARCHS)}")
    bs = a.batch_size
    L1 = parse_l1(a.l1)
    tokens = max(1, round(a.tokens / bs)) * bs
    width = a.width or a.features

    # -- data: SAELens's generator, SAELens's defaults, sampled once ----------------------------
    t0 = time.perf_counter()
    mcfg = SyntheticModelConfig(num_features=a.features, hidden_dim=a.dim, seed=a.seed)
    model = SyntheticModel(mcfg)
    true_l0 = float(model.activation_generator.firing_probabilities.sum())
    k = a.k or max(1, round(true_l0))
    torch.manual_seed(TRAIN_SEED)
    parts, left = [], tokens
    while left:
        n = min(left, 65_536)
        parts.append(model.sample(n))
        left -= n
    x = torch.cat(parts).contiguous()
    gen_s = time.perf_counter() - t0
    print(f"data: SAELens SyntheticModel, {a.features} features in {a.dim} dims (config defaults, seed {a.seed}), "
          f"expected L0 {true_l0:.2f}; {tokens:,} rows generated in {gen_s:.1f}s", flush=True)

    rows = []
    saes_dir = os.path.join(out, "saes")

    x_chk = x[-4096:]

    def score(name: str, impl: str, arch: str, folder: str, tps: float, train_s: float, mine=None, **extra) -> None:
        loaded = SAE.load_from_disk(folder, device="cpu")
        ev = _eval(loaded, model, a.eval_samples, min(a.eval_samples, 16_384))
        row = {"name": name, "impl": impl, "arch": arch, "saelens_arch": loaded.cfg.architecture(),
               "tokens_per_s": tps, "train_s": train_s, "path": folder, **extra, **ev}
        if mine is not None:   # does SAELens compute with the file what saeray computes with the module?
            with torch.no_grad():
                o = mine(x_chk)
                f = loaded.encode(x_chk)
                row["roundtrip"] = {
                    "recon_max_abs_diff": float((loaded.decode(f) - o.recon).abs().max()),
                    "latents_max_abs_diff": float((f - o.latents).abs().max()),
                    "active_mismatch_frac": float(((f != 0) != (o.latents != 0)).float().mean()),
                    "x_abs_max": float(x_chk.abs().max())}
        rows.append(row)
        print(f"  {name}: mcc={ev['mcc']:.3f} ev={ev['explained_variance']:.3f} l0={ev['sae_l0']:.2f} "
              f"dead={ev['dead_latents']} tok/s={tps:,.0f}", flush=True)

    # -- (a) SAELens TopK, SAELens's synthetic trainer -----------------------------------------
    if not a.no_saelens:
        torch.manual_seed(a.seed)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.dim, d_sae=width, k=k))
        replay = _Replay(x)
        print(f"train: sae-lens topk (train_toy_sae defaults), {tokens:,} rows", flush=True)
        t1 = time.perf_counter()
        train_toy_sae(sae, _Identity(model.feature_dict.feature_vectors), replay, training_samples=tokens, batch_size=bs)
        dt = time.perf_counter() - t1
        assert replay.i == tokens, (replay.i, tokens)
        folder = os.path.join(saes_dir, "saelens-topk")
        sae.save_inference_model(folder)
        try:   # the other direction: does saeray's reader take SAELens's own TopK file?
            sio.load(folder)
            saeray_reads = "ok"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            saeray_reads = f"{type(e).__name__}: {e}"
        lr = inspect.signature(train_toy_sae).parameters["lr"].default
        score("saelens-topk", "sae-lens", "topk", folder, tokens / dt, dt, k=k, l1=None, lr=lr,
              saeray_load=saeray_reads)

    # -- (b) saeray, defaults ----------------------------------------------------------------------
    xn = x.numpy()

    def batches(skip: int):
        for i in range(skip, tokens, bs):
            yield xn[i:i + bs]

    for arch in archs:
        # BatchTopK's k is the mean per token, the data's L0 itself (docs/training.md)
        kv = {"topk": k, "batchtopk": a.k or batchtopk_k(true_l0)}.get(arch)
        l1 = L1.get(arch)
        opts = given_opts(htf=a.htf, ltf=a.ltf) if arch == "gba" else {}
        name = f"saeray-{arch}{opts_suffix(opts)}"
        cfg = TrainConfig.for_run(tokens, bs)
        print(f"train: saeray {arch}, {tokens:,} rows", flush=True)
        t1 = time.perf_counter()
        (sae, m), = fit(batches, a.dim, [Variant(arch, width, k=kv, l1=l1, opts=opts)], cfg,
                          progress_desc=name).values()
        dt = time.perf_counter() - t1
        folder = os.path.join(saes_dir, name)
        sio.save(sae, folder, info={"bench": "saelens", "train": {"tokens": tokens, "batch_size": bs, "lr": m.get("lr")}})
        # GBA's range as the trained module holds it (the defaults, or --htf/--ltf)
        gba = {"htf": sae.htf, "ltf": sae.ltf} if arch == "gba" else {}
        score(name, "saeray", arch, folder, tokens / dt, dt, mine=sae, k=kv, l1=l1, lr=cfg.lr, **gba,
              fit_tokens_per_s=m["tokens_per_s"])

    res = {
        "bench": "saelens",
        "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "numpy": np.__version__},
        "machine": {"device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "data": {"generator": "sae_lens.synthetic.SyntheticModel", "config": mcfg.to_dict(), "true_l0": true_l0,
                 "tokens": tokens, "gen_s": gen_s, "eval_samples": a.eval_samples, "eval_seed": EVAL_SEED},
        "train": {"width": width, "k": k, "batch_size": bs, "tokens": tokens, "l1": {s: L1[s] for s in archs if s in L1},
                  "saelens": "train_toy_sae defaults", "saeray": "TrainConfig.for_run defaults",
                  "tokens_per_s": "training tokens / wall seconds of the train_toy_sae or fit call (data "
                                  "pre-generated; saeray's includes its data-dependent init; fit_tokens_per_s excludes it)"},
        "rows": rows,
        "out": out,
    }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def format_table(res: dict) -> str:
    d, t = res["data"], res["train"]
    lines = [f"SAELens {res['versions']['sae_lens']} vs saeray on SAELens's synthetic data: {d['config']['num_features']} "
             f"features in {d['config']['hidden_dim']} dims, true L0 {d['true_l0']:.2f}; width {t['width']}, k {t['k']}, "
             f"{t['tokens']:,} tokens at batch {t['batch_size']}; CPU, {res['machine']['threads']} torch thread(s)",
             f"{'SAE':18s} {'MCC':>6s} {'expl.var':>8s} {'unique':>7s} {'L0':>6s} {'dead':>5s} {'F1':>6s} "
             f"{'shrink':>6s} {'tok/s':>9s}"]
    for r in res["rows"]:
        lines.append(f"{r['name']:18s} {r['mcc']:6.3f} {r['explained_variance']:8.3f} {r['uniqueness']:7.3f} "
                     f"{r['sae_l0']:6.2f} {r['dead_latents']:5d} {r['f1']:6.3f} {r['shrinkage']:6.3f} "
                     f"{r['tokens_per_s']:9,.0f}")
    rt = [r["roundtrip"] for r in res["rows"] if r.get("roundtrip")]
    if rt:
        lines.append(f"saeray files read by SAELens's SAE.load_from_disk vs saeray's own module: max |d latents| "
                     f"{max(x['latents_max_abs_diff'] for x in rt):.1e}, max |d recon| {max(x['recon_max_abs_diff'] for x in rt):.1e}, "
                     f"active-set mismatches {max(x['active_mismatch_frac'] for x in rt):.1e}")
    for r in res["rows"]:
        if r.get("saeray_load"):
            lines.append(f"saeray.sae.io.load of SAELens's {r['name']} folder: {r['saeray_load']}")
    lines.append(f"results: {res['out']}/result.json, SAEs in {res['out']}/saes/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    res = run(a)
    print(format_table(res), flush=True)
    if a.json:
        sys.stdout.write(json.dumps(res, default=str) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

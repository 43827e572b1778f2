"""``saeray bench gradsae``: how fast GradSAE, integrated gradients and exact ablation score SAE
latents, and how well the first two agree with the third, on storyworld-4l with the default
audit's TopK SAEs (trained first if the run folder lacks them) and full-length fact prompts.

Per prompt (kept when the unmodified model answers it by greedy decoding): one clean pass, then
GradSAE (one forward + backward for every latent), integrated gradients (``ig_steps`` rows in one
batched forward + backward) and exact ablation of every active latent (``exact_batch`` latents per
forward), each timed alone, in process (no Ray: the figures are the methods', not the scheduler's);
GradSAE and IG take milliseconds, so each is the median of 5 calls.
Latents scored per second = active latents / wall time; speed-up = exact time / GradSAE time.
Agreement is per prompt over the active latents (median Spearman/Pearson, mean top-k overlap).

Where the first-order score falls short, the breakdown says where: per layer; Spearman over the
latents whose exact effect is at least ``LARGE`` (the ones that matter) and over the rest; how
often each score's top latent is the exact top latent; and the same figures with the output taken
as a logit difference instead of a probability (a saturated probability is where a gradient
misses most).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from ..sweeps.agreement import nanmean, nanmedian, spearman
from ..sweeps.gradsae import GradOptions
from ..sweeps.job import run_prompt

log = logging.getLogger("saeray")
LARGE = 1e-3


def ensure_run(spec_path: str, address: str | None):
    """The default audit's run with its SAEs trained (trains what is missing)."""
    from ..run.audit import open_run, run_targets
    from ..spec import load_spec

    rc = open_run(load_spec(spec_path))
    res = run_targets(rc, ["train"], address)
    t = rc.targets[0]
    return rc, t, res[t.id]["train"]


def _retime(model, sae, hp: str, p, opt: GradOptions, repeats: int) -> tuple[float, float]:
    """Median wall time of GradSAE and of integrated gradients over ``repeats`` calls: a few
    milliseconds each, too short for one reading on a busy machine (exact ablation runs for
    hundreds of milliseconds and is read once)."""
    from ..sweeps.gradsae import integrated, scores
    from ..sweeps.splice import clean_pass

    c = clean_pass(model, sae, hp, p.ids, p.keep)
    out = []
    for fn in (lambda: scores(model, sae, hp, c, p.answer_ids[0], replace(opt, ig_steps=0)),
               lambda: integrated(model, sae, hp, c, p.answer_ids[0], opt)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out.append(statistics.median(ts))
    return out[0], out[1]


def measure(model, sae, hp: str, prompts, opt: GradOptions, exact_batch: int, topk: int, repeats: int = 5) -> dict:
    per = []
    for p in prompts:
        r = run_prompt(model, sae, hp, dict(p.__dict__), None, ["agreement"], [], opt, exact_batch, topk)
        if not r["correct"]:
            continue
        r["t_gradsae_s"], r["t_ig_s"] = _retime(model, sae, hp, p, opt, repeats)
        lat = r["latents"]
        big = np.abs(lat["exact"]) >= LARGE
        r["large"] = {m: spearman(lat[m][big], lat["exact"][big]) if big.sum() > 2 else math.nan
                      for m in ("gradsae", "signed", "ig", "ig_signed", "activation") if m in lat}
        r["small"] = {m: spearman(lat[m][~big], lat["exact"][~big]) if (~big).sum() > 2 else math.nan
                      for m in ("gradsae", "signed", "ig_signed") if m in lat}
        top = int(np.argmax(lat["exact"]))
        r["top1"] = {m: float(int(np.argmax(lat[m])) == top) for m in ("gradsae", "signed", "ig", "activation") if m in lat}
        r["n_large"] = int(big.sum())
        per.append(r)
    if not per:
        return {"prompts": 0}
    n_lat = sum(r["n_active"] for r in per)
    t_g, t_ig, t_ex = (sum(r.get(k, 0.0) for r in per) for k in ("t_gradsae_s", "t_ig_s", "t_exact_s"))
    out = {"prompts": len(per), "mean_tokens": nanmean([r["n_tokens"] for r in per]),
           "mean_active_latents": n_lat / len(per), "mean_large_latents": nanmean([r["n_large"] for r in per]),
           "mean_p_answer": nanmean([r["p_model"] for r in per]),
           "gradsae_latents_per_s": n_lat / t_g, "exact_latents_per_s": n_lat / t_ex, "speedup": t_ex / t_g}
    if t_ig:
        out.update(ig_latents_per_s=n_lat / t_ig, ig_speedup=t_ex / t_ig)
    for m, name in (("gradsae", ""), ("signed", "signed_"), ("ig", "ig_"), ("ig_signed", "ig_signed_"),
                    ("activation", "activation_")):
        if m not in per[0]["agreement"]:
            continue
        out[f"{name}spearman"] = nanmedian([r["agreement"][m]["spearman"] for r in per])
        out[f"{name}pearson"] = nanmedian([r["agreement"][m]["pearson"] for r in per])
        out[f"{name}topk_overlap"] = nanmean([r["agreement"][m]["topk_overlap"] for r in per])
        if m in per[0]["large"]:
            out[f"{name}spearman_large"] = nanmedian([r["large"][m] for r in per])
        if m in per[0]["small"]:
            out[f"{name}spearman_small"] = nanmedian([r["small"][m] for r in per])
        if m in per[0]["top1"]:
            out[f"{name}top1_hit"] = nanmean([r["top1"][m] for r in per])
    return out


def run_bench(spec_path: str = "jobs/storyworld.yaml", hookpoints: list[str] | None = None, primary: str = "resid_post.2",
              n_prompts: int = 32, min_len: int = 96, exact_batch: int = 32, ig_steps: int = 10, topk: int = 10,
              threads: int = 2, address: str | None = None) -> dict:
    from ..models.shard import Stage
    from ..sae import io
    from ..sweeps.prompts import build

    rc, t, trained = ensure_run(spec_path, address)
    torch.set_num_threads(threads)
    hps = hookpoints or list(trained.saes)
    if primary not in hps:
        primary = hps[0]
    n_layers = t.ref.meta_model().config.num_hidden_layers
    model = Stage.from_pretrained(t.ref.path, (0, n_layers), revision=t.ref.revision, dtype=t.ref.dtype)
    ps = build("storyworld-facts", t.ref.tokenizer(), rc.resolved.corpus, n_prompts, min_len)
    opt = GradOptions(ig_steps=ig_steps)
    out: dict = {"model": t.model, "revision": t.revision, "threads": threads, "prompt_set": "storyworld-facts",
                 "candidate_prompts": len(ps.prompts), "min_prompt_words": min_len, "exact_batch": exact_batch,
                 "ig_steps": ig_steps, "topk": topk, "output": opt.output, "error_term": opt.error_term, "by_layer": {}}
    for hp in hps:
        name = next((n for n in trained.saes[hp] if n.startswith("topk-")), None)
        if name is None:
            continue
        sae = io.load(rc.store.url_of(f"{t.folder}/{trained.saes[hp][name]['path']}"), device="cpu").eval()
        run_prompt(model, sae, hp, dict(ps.prompts[0].__dict__), None, ["agreement"], [], opt, exact_batch, topk)  # warm-up
        t0 = time.perf_counter()
        res = measure(model, sae, hp, ps.prompts, opt, exact_batch, topk)
        res["sae"], res["wall_s"] = name, round(time.perf_counter() - t0, 1)
        log.info(f"bench gradsae {hp} {name}: ρ {res.get('spearman', math.nan):.3f}, speed-up {res.get('speedup', math.nan):.0f}x")
        out["by_layer"][hp] = res
        if hp == primary:
            out.update({k: v for k, v in res.items()})
            out["hookpoint"] = hp
            ld = measure(model, sae, hp, ps.prompts, replace(opt, output="logit_diff"), exact_batch, topk)
            out["logit_diff"] = {k: ld[k] for k in ld if "spearman" in k or "pearson" in k or "overlap" in k or "top1" in k}
            # one-at-a-time ablation on a few prompts: what batching buys
            from ..sweeps.ablation import effect_one
            from ..sweeps.splice import clean_pass

            n, t_one = 0, 0.0
            for p in ps.prompts[:2]:
                c = clean_pass(model, sae, hp, p.ids, p.keep)
                act = torch.nonzero((c.f > 0).any(0)).flatten()[:64]
                t1 = time.perf_counter()
                for i in act.tolist():
                    effect_one(model, sae, hp, c, i, p.answer_ids[0])
                t_one += time.perf_counter() - t1
                n += len(act)
            # effect_one runs two whole-model forwards (reference + edited); a sweep shares the reference
            out["exact_unbatched_latents_per_s"] = n / (t_one / 2)
            out["speedup_vs_unbatched"] = out["gradsae_latents_per_s"] / out["exact_unbatched_latents_per_s"]
    out["targets"] = {"speedup_min": 100, "spearman_min": 0.8}
    return out


def render(res: dict) -> str:
    lines = [f"GradSAE vs exact ablation on {res['model']}@{res['revision']} ({res['prompts']} prompts of "
             f"{res['candidate_prompts']} kept, ~{res['mean_tokens']:.0f} tokens, {res['threads']} threads)",
             f"{'hook point':<14}{'active':>7}{'GradSAE/s':>11}{'IG/s':>9}{'exact/s':>9}{'speed-up':>9}"
             f"{'ρ':>7}{'ρ signed':>9}{'ρ IG':>7}{'r':>7}{'top-k':>7}{'ρ large':>8}{'top1':>6}"]
    for hp, r in res["by_layer"].items():
        if not r.get("prompts"):
            continue
        lines.append(f"{hp:<14}{r['mean_active_latents']:>7.0f}{r['gradsae_latents_per_s']:>11.0f}"
                     f"{r.get('ig_latents_per_s', math.nan):>9.0f}{r['exact_latents_per_s']:>9.0f}{r['speedup']:>9.0f}"
                     f"{r['spearman']:>7.3f}{r['signed_spearman']:>9.3f}{r.get('ig_spearman', math.nan):>7.3f}"
                     f"{r['pearson']:>7.3f}{r['topk_overlap']:>7.2f}{r['spearman_large']:>8.3f}{r['top1_hit']:>6.2f}")
    ld = res.get("logit_diff", {})
    if ld:
        lines.append(f"{res['hookpoint']} with output = logit difference: ρ {ld['spearman']:.3f}, ρ signed "
                     f"{ld['signed_spearman']:.3f}, ρ IG {ld.get('ig_spearman', math.nan):.3f}, top-k {ld['topk_overlap']:.2f}, "
                     f"top1 {ld['top1_hit']:.2f}")
    return "\n".join(lines)

"""``saeray bench train``: SAE training throughput before/after the sparse decode (TopK k=32 at
d=768, widths 16384 and 65536), on CPU and, when present, CUDA.

Two :class:`saeray.sae.train.MultiTrainer` are built per width, one with the dense decode
(``sparse_decode = False``: ``f @ W_dec``, the "before") and one with the sparse one, each warmed
up by one step. Then timed blocks of whole real training steps (forward, loss, backward, Adam,
decoder renormalisation, statistics; at least ``seconds`` and one step per block) alternate
dense, sparse, dense, sparse, ... for ``rounds`` rounds on random activations, so that load from
other jobs on a shared machine hits both alike. The speed-up is the median over rounds of
sparse/dense within the same round; tokens/s are per-mode medians. Dense FLOPs per token are
12·d·width (encoder and decoder matmuls, forward 2·d·width each, backward twice the forward); the
sparse decode removes the decoder's half, leaving ≈ 6·d·width + O(k·d).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..sae.train import MultiTrainer, TrainConfig, Variant

D, WIDTHS, K, CPU_BATCH, CUDA_BATCH = 768, (16384, 65536), 32, 1024, 4096


def flops_per_token(d: int, width: int) -> float:
    return 12.0 * d * width


def _trainer(variant: Variant, d: int, device: str, batch_size: int, sparse: bool) -> tuple[MultiTrainer, torch.Tensor]:
    torch.manual_seed(0)
    tr = MultiTrainer(d, [variant], TrainConfig(tokens=10**9, batch_size=batch_size, device=device,
                                                log_every=10**9, warmup_steps=1))
    for sae in tr.saes.values():
        sae.sparse_decode = sparse
    x = torch.randn(batch_size, d, device=device)
    tr.init_from_data(x)
    tr.step(x)  # warm-up (allocations, kernel selection)
    return tr, x


def _timed(tr: MultiTrainer, x: torch.Tensor, device: str, seconds: float) -> dict:
    """Whole steps for at least ``seconds`` (at least one step)."""
    if device == "cuda":
        torch.cuda.synchronize()
    steps, t0 = 0, time.perf_counter()
    while True:
        tr.step(x)
        steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return {"steps": steps, "seconds": dt, "tokens_per_s": steps * x.shape[0] / dt}


def measure_pair(variant: Variant, d: int, device: str, batch_size: int, seconds: float, rounds: int) -> dict:
    """Both trainers built and warmed up first, then timed blocks alternating dense, sparse, ..."""
    trs = {mode: _trainer(variant, d, device, batch_size, sparse=mode == "sparse") for mode in ("dense", "sparse")}
    runs: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for _ in range(rounds):
        for mode, (tr, x) in trs.items():
            runs[mode].append(_timed(tr, x, device, seconds))
    return runs


def run_train_speed(seconds: float = 2.0, rounds: int = 5, arch: str = "topk", d: int = D,
                    widths: tuple[int, ...] = WIDTHS, k: int = K, cpu_batch: int = CPU_BATCH,
                    cuda: bool | None = None) -> dict:
    if cuda is None:
        cuda = torch.cuda.is_available()
    devices = [("cpu", cpu_batch)] + ([("cuda", CUDA_BATCH)] if cuda else [])
    rows = []
    for dev, bs in devices:
        for width in widths:
            runs = measure_pair(Variant(arch, width, k=k), d, dev, bs, seconds, rounds)
            tps = {m: [r["tokens_per_s"] for r in rs] for m, rs in runs.items()}
            ratio = [s / dn for s, dn in zip(tps["sparse"], tps["dense"])]
            rows.append({"arch": arch, "device": dev, "width": width, "batch_size": bs,
                         "dense_tokens_per_s": statistics.median(tps["dense"]),
                         "sparse_tokens_per_s": statistics.median(tps["sparse"]),
                         "speedup": statistics.median(ratio), "speedup_per_round": ratio, "rounds": runs,
                         "dense_gflops_per_s": statistics.median(tps["dense"]) * flops_per_token(d, width) / 1e9})
    return {"d_in": d, "k": k, "arch": arch, "seconds": seconds, "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None, "results": rows}


def format_table(res: dict) -> str:
    lines = [f"SAE training speed, {res['arch']} k={res['k']}, d={res['d_in']}, dense vs sparse decode "
             f"({res['rounds']} alternating rounds of >= {res['seconds']:g} s per mode, medians; "
             f"{res['torch_threads']} torch threads)",
             f"{'device':6s} {'width':>6s} {'batch':>6s} {'dense tok/s':>12s} {'sparse tok/s':>13s} {'speed-up':>9s}"
             "  per round"]
    for r in res["results"]:
        per = " ".join(f"{x:.2f}" for x in r["speedup_per_round"])
        lines.append(f"{r['device']:6s} {r['width']:6d} {r['batch_size']:6d} {r['dense_tokens_per_s']:12,.0f} "
                     f"{r['sparse_tokens_per_s']:13,.0f} {r['speedup']:8.2f}x  {per}")
    return "\n".join(lines)

"""``saeray bench train``: SAE training throughput at a realistic size (d=768, width 16384; TopK
k=32 and ReLU-L1), on CPU and, when present, CUDA.

Each configuration runs the real :class:`saeray.sae.train.MultiTrainer` step (forward, loss,
backward, Adam, decoder renormalisation, statistics) on random activations for about ``seconds``
after one warm-up step. FLOPs counted per token are the dense matmuls only, 12·d·width: forward
encoder and decoder 2·d·width each, backward twice the forward (our TopK decodes with a dense
matmul, so it does the same matmul work as ReLU).
"""
from __future__ import annotations

import time

import torch

from ..sae.train import MultiTrainer, TrainConfig, Variant

D, WIDTH, K = 768, 16384, 32


def flops_per_token(d: int = D, width: int = WIDTH) -> float:
    return 12.0 * d * width


def measure(variant: Variant, device: str, batch_size: int, seconds: float) -> dict:
    torch.manual_seed(0)
    tr = MultiTrainer(D, [variant], TrainConfig(tokens=10**9, batch_size=batch_size, device=device,
                                                log_every=10**9, warmup_steps=1))
    x = torch.randn(batch_size, D, device=device)
    tr.init_from_data(x)
    tr.step(x)  # warm-up (allocations, kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
    steps, t0 = 0, time.perf_counter()
    while True:
        tr.step(x)
        steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= seconds and steps >= 2:
            break
    tps = steps * batch_size / dt
    return {"arch": variant.arch, "device": device, "batch_size": batch_size, "steps": steps, "seconds": dt,
            "tokens_per_s": tps, "flops_per_token": flops_per_token(), "gflops_per_s": tps * flops_per_token() / 1e9}


def run_train_speed(seconds: float = 3.0) -> dict:
    devices = [("cpu", 256)] + ([("cuda", 4096)] if torch.cuda.is_available() else [])
    rows = []
    for dev, bs in devices:
        for v in (Variant("topk", WIDTH, k=K), Variant("relu", WIDTH, l1=1.0)):
            rows.append(measure(v, dev, bs, seconds))
    return {"d_in": D, "width": WIDTH, "k": K, "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "results": rows}


def format_table(res: dict) -> str:
    lines = [f"SAE training speed, d={res['d_in']}, width={res['width']}, dense FLOPs/token = "
             f"{flops_per_token() / 1e6:.0f} M (12·d·width)",
             f"{'arch':8s} {'device':6s} {'batch':>6s} {'tokens/s':>12s} {'GFLOP/s':>9s}"]
    for r in res["results"]:
        lines.append(f"{r['arch']:8s} {r['device']:6s} {r['batch_size']:6d} {r['tokens_per_s']:12,.0f} {r['gflops_per_s']:9.1f}")
    return "\n".join(lines)

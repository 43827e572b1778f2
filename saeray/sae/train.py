"""One training loop for every architecture, training several SAE variants on one shared stream.

Each batch is fed to every variant (the next stage packs all variants of a hook point into one Ray
Train run this way: the activations are read once). Per variant: Adam, linear warm-up then linear
decay to zero over the last ``1 − decay_start`` of training, decoder unit-norm where the method wants
it (parallel gradient removed before the step, rows renormalised after), arch-specific statistics
(BatchTopK threshold, GBA bias adaptation, dead-latent counters) updated after the step.

Data-dependent init, once, from the first ``init_tokens`` rows of the stream: one input scale
``c = sqrt(target_sq_norm / E‖x‖²)`` shared by every variant (stored in each SAE so the saved file
works on raw activations), and ``b_dec`` = geometric median (or mean) of the scaled sample.

Exact resume: a checkpoint holds every variant's module (incl. buffers), optimizer and scheduler
state, the step and token counters and the RNG states; ``batches(skip_tokens)`` must return the
stream from row ``skip_tokens`` on, so a resumed run sees exactly the batches an uninterrupted run
would and ends with the same weights (tests/test_sae_train.py checks bit equality on CPU).

Data parallel: inside an initialised ``torch.distributed`` group (Ray Train sets one up for
``sae.train.workers > 1``) every rank takes its own slice of each global batch; gradients are
averaged across ranks and the statistics updates (dead counters, BatchTopK threshold, GBA windows)
see the latents gathered from every rank, so a DP run computes what one process would on the
global batch (BatchTopK's batch-level top-k is the exception: it is taken per rank slice). Rank 0
broadcasts the data-dependent init and alone writes checkpoints.

Devices: CPU in float32; on CUDA the forward runs under bf16 autocast (parameters, optimizer state
and the loss reductions stay float32).
"""
from __future__ import annotations

import io
import math
import pickle
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError, SaerayError
from ..progress import progress
from torch import Tensor

from .base import SAE, SAEOutput, geometric_median
from .registry import build


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_state(sae: SAE) -> None:
    import torch.distributed as dist

    for t in list(sae.parameters()) + list(sae.buffers()):
        dist.broadcast(t.data, src=0)


def _average_grads(sae: SAE, world: int) -> None:
    import torch.distributed as dist

    for p in sae.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _gather_rows(t: Tensor | None, world: int) -> Tensor | None:
    import torch.distributed as dist

    if t is None:
        return None
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

CKPT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    tokens: int = 1_000_000
    batch_size: int = 1024
    lr: float | None = None             # None: each architecture's SAE.default_lr()
    warmup_steps: int = 100
    decay_start: float = 0.8            # fraction of training after which lr decays linearly to 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 500         # steps; 0 = only at the end
    dead_window_tokens: int = 10_000_000  # "dead" = no firing in this many tokens (Gao et al.)
    init_tokens: int = 16_384           # rows used for input scale and b_dec init
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    target_sq_norm: float = 1.0         # E‖c·x‖² after scaling
    device: str = "cpu"
    log_every: int = 10                 # steps between progress updates

    @classmethod
    def for_run(cls, tokens: int, batch_size: int, **kw) -> "TrainConfig":
        """Schedule defaults scaled to the run's length: warm-up over the first 5 % of steps (at
        most 1000); "dead" = no firing in the last 10 % of tokens (at most Gao et al.'s 10M)."""
        steps = math.ceil(tokens / batch_size)
        return cls(tokens=tokens, batch_size=batch_size, warmup_steps=min(1000, max(1, steps // 20)),
                   dead_window_tokens=min(10_000_000, max(batch_size, tokens // 10)), **kw)


@dataclass
class Variant:
    arch: str
    width: int
    k: int | None = None
    l1: float | None = None
    name: str | None = None
    seed: int | None = None             # default: derived from TrainConfig.seed and the name
    lr: float | None = None             # default: TrainConfig.lr, else the architecture's default
    opts: dict = field(default_factory=dict)   # extra architecture kwargs (e.g. GBA htf/ltf)

    def __post_init__(self) -> None:
        if self.name is None:
            knob = f"-k{self.k:g}" if self.k is not None else (f"-l1{self.l1:g}" if self.l1 is not None else "")
            seed = f"-s{self.seed}" if self.seed is not None else ""
            self.name = f"{self.arch}-w{self.width}{knob}{opts_suffix(self.opts)}{seed}"


def opts_suffix(opts: dict) -> str:
    """``-htf0.01-ltf1e-05``: architecture options in a name, so two GBA ranges are two SAE folders."""
    return "".join(f"-{k}{format(v, 'g') if isinstance(v, float) else v}" for k, v in sorted(opts.items()))


def _lr_lambda(warmup: int, total: int, decay_start: float) -> Callable[[int], float]:
    d0 = int(total * decay_start)

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if step >= d0 and total > d0:
            w *= max(0.0, (total - step) / (total - d0))
        return w
    return f


def _adam(params: list, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Adam with the fused kernel where torch has one for these tensors: the same update in one
    pass over each tensor instead of a dozen elementwise ops. Measured on the 2-core CPU, one
    thread: 250 → 17 ms per step at d = 768, width 16k (a quarter of a TopK step), 0.32 → 0.05 ms
    at d = 64, width 256."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


WARM_STARTABLE = ("relu", "topk")   # architectures whose every parameter carries over exactly


class MultiTrainer:
    def __init__(self, d_in: int, variants: list[Variant], cfg: TrainConfig):
        if not variants:
            raise InputError("no SAE variants to train")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise InputError(f"variant names must be unique, got {names}")
        if cfg.tokens < 1 or cfg.batch_size < 1:
            raise InputError(f"tokens={cfg.tokens} and batch_size={cfg.batch_size} must be positive")
        self.d_in, self.variants, self.cfg = d_in, variants, cfg
        self.device = torch.device(cfg.device)
        self.autocast = self.device.type == "cuda"
        self.total_steps = max(1, math.ceil(cfg.tokens / cfg.batch_size))
        self.saes: dict[str, SAE] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.rank, self.world = dist_rank_world()
        self.lrs: dict[str, float] = {}
        for v in variants:
            seed = v.seed if v.seed is not None else cfg.seed * 1_000_003 + zlib.crc32(v.name.encode())
            torch.manual_seed(seed)
            sae = build(v.arch, d_in, v.width, k=v.k, l1=v.l1, **v.opts).to(self.device)
            sae.dead_tokens = cfg.dead_window_tokens
            # settings that depend on the run's length (GBA's controller) see the global batch, so a
            # data-parallel run and one process resolve them alike
            sae.configure_for_run(self.total_steps, cfg.batch_size * self.world)
            sae.train()
            self.lrs[v.name] = v.lr or cfg.lr or sae.default_lr()
            opt = _adam([p for p in sae.parameters() if p.requires_grad], self.lrs[v.name], tuple(cfg.adam_betas))
            self.saes[v.name], self.opts[v.name] = sae, opt
            self.scheds[v.name] = torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(cfg.warmup_steps, self.total_steps, cfg.decay_start))
        torch.manual_seed(cfg.seed)
        self.tokens_seen = 0
        self.steps = 0
        self.initialized = False

    @torch.no_grad()
    def init_from_data(self, x_sample) -> None:
        x = torch.as_tensor(np.asarray(x_sample, dtype=np.float32)).to(self.device)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InputError(f"init sample has shape {tuple(x.shape)}, expected [N, {self.d_in}]")
        msn = float(x.double().pow(2).sum(1).mean())
        if not math.isfinite(msn) or msn <= 0:
            raise InputError(f"activations have mean squared norm {msn}; need finite, non-zero data")
        c = math.sqrt(self.cfg.target_sq_norm / msn)
        xs = x * c
        if self.cfg.b_dec_init == "geometric_median":
            b = geometric_median(xs)
        elif self.cfg.b_dec_init == "mean":
            b = xs.mean(0)
        elif self.cfg.b_dec_init == "zeros":
            b = torch.zeros(self.d_in, device=self.device)
        else:
            raise InputError(f"b_dec_init='{self.cfg.b_dec_init}'; use geometric_median, mean or zeros")
        for sae in self.saes.values():
            sae.input_scale.fill_(c)
            sae.b_dec.copy_(b)
            sae.init_from_data(xs)
            if self.world > 1:  # every rank starts from rank 0's data init (scale, b_dec, the SAE's own)
                _broadcast_state(sae)
        self.initialized = True

    @torch.no_grad()
    def warm_start(self, urls: dict[str, str]) -> None:
        """Start variants from saved SAEs (``{variant name: SAE folder}``, e.g. the previous
        checkpoint's), after :meth:`init_from_data`: every weight carries over in the normalised space
        (activations scaled to a fixed mean squared norm) and only the input scale is this data's,
        so a residual stream that grew between checkpoints meets the same SAE, and latent i keeps
        its meaning, as in SAE-Track, which initialises each checkpoint's SAE from the previous one."""
        from . import io

        for name, url in urls.items():
            sae = self.saes[name]
            if sae.arch not in WARM_STARTABLE:
                raise InputError(f"warm start: {name} is not one of {', '.join(WARM_STARTABLE)} (only these carry "
                                 "over exactly); train it from scratch")
            prev = io.load(url, device=str(self.device))
            if (prev.d_in, prev.width) != (sae.d_in, sae.width):
                raise InputError(f"warm start: {url} has d_in {prev.d_in}, width {prev.width}; {name} needs "
                                 f"{sae.d_in}, {sae.width}")
            t = prev.export()                       # raw units (its input scale is 1)
            # back into the normalised space it was trained in (its scale is recorded at save); this
            # data keeps its own input scale
            c_old = float(io.load_info(url).get("input_scale_folded", 1.0))
            sae.W_dec.copy_(t["W_dec"] * c_old)
            sae.W_enc.copy_(t["W_enc"] / c_old)
            sae.b_enc.copy_(t["b_enc"])
            sae.b_dec.copy_(t["b_dec"] * c_old)
            if self.world > 1:
                _broadcast_state(sae)

    def step(self, x) -> dict[str, dict[str, float]]:
        if not self.initialized:
            raise SaerayError("MultiTrainer.step before init_from_data")
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        n = x.shape[0]
        metrics: dict[str, dict[str, float]] = {}
        for name, sae in self.saes.items():
            opt = self.opts[name]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = sae(x)
            loss = sum(out.losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.world > 1:
                _average_grads(sae, self.world)
            if sae.unit_norm_decoder:
                sae.remove_parallel_grad()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            scale = sae.row_step_scale()
            if scale is not None:
                W = sae.decoder_param()
                before = W.detach().clone()
            opt.step()
            if scale is not None:
                with torch.no_grad():
                    W.copy_(torch.lerp(before, W, scale[:, None].to(W.dtype)))
            self.scheds[name].step()
            if sae.unit_norm_decoder:
                sae.normalize_decoder()
            if self.world > 1:
                sae.on_step(SAEOutput(out.recon, _gather_rows(out.latents.detach(), self.world),
                                      pre=_gather_rows(None if out.pre is None else out.pre.detach(), self.world)),
                            n * self.world)
            else:
                sae.on_step(out, n)
            if self.steps % self.cfg.log_every == 0 or self.steps + 1 >= self.total_steps:
                with torch.no_grad():
                    xf, rf = x.double(), out.recon.detach().double()
                    fvu = float((xf - rf).pow(2).sum() / (xf - xf.mean(0)).pow(2).sum().clamp_min(1e-30))
                    metrics[name] = {"loss": float(loss), **{k: float(v) for k, v in out.losses.items()},
                                     "l0": float((out.latents != 0).sum(-1).float().mean()), "fvu": fvu,
                                     "dead_frac": float(sae.dead_mask().float().mean())}
        self.tokens_seen += n
        self.steps += 1
        return metrics

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "cfg": asdict(self.cfg),
            "variants": [asdict(v) for v in self.variants],
            "d_in": self.d_in,
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "initialized": self.initialized,
            "saes": {k: s.state_dict() for k, s in self.saes.items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "scheds": {k: s.state_dict() for k, s in self.scheds.items()},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, sd: dict) -> None:
        mine = [asdict(v) for v in self.variants]
        if sd["variants"] != mine or sd["d_in"] != self.d_in:
            raise InputError("checkpoint was written for different SAE variants or input width; "
                             "use a new --out location or delete the old checkpoint")
        for k in ("tokens", "batch_size", "seed"):
            if sd["cfg"][k] != getattr(self.cfg, k):
                raise InputError(f"checkpoint has {k}={sd['cfg'][k]} but this run asks for {getattr(self.cfg, k)}; "
                                 "use a new --out location or the same settings")
        for k, s in self.saes.items():
            s.load_state_dict(sd["saes"][k])
            self.opts[k].load_state_dict(sd["opts"][k])
            self.scheds[k].load_state_dict(sd["scheds"][k])
        self.tokens_seen, self.steps, self.initialized = sd["tokens_seen"], sd["steps"], sd["initialized"]
        torch.set_rng_state(sd["rng"]["torch"])
        if sd["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["rng"]["cuda"])

    def save_checkpoint(self, store) -> None:
        if self.rank != 0:  # identical state on every rank: one writer
            return
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        with store.open_write(CKPT_NAME) as f:
            f.write(buf.getvalue())

    def load_checkpoint(self, store) -> bool:
        if store is None or not store.exists(CKPT_NAME):
            return False
        # tensors and plain containers only: the bytes come from a store that others may write to
        # (a shared bucket), and a full unpickle would run whatever code a crafted file names
        try:
            sd = torch.load(io.BytesIO(store.read_bytes(CKPT_NAME)), map_location=self.device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise InputError(f"{store.url_of(CKPT_NAME)} is not a checkpoint saeray can load safely (tensors and "
                             f"plain values only): {why}. Delete it to train this unit from the start, or use "
                             "another run name") from None
        if not isinstance(sd, dict) or sd.get("version") != 1:
            raise InputError(f"{store.url_of(CKPT_NAME)} is not a saeray trainer checkpoint; delete it to train "
                             "this unit from the start, or use another run name")
        self.load_state_dict(sd)
        return True


def skip_rows(it: Iterator, n: int) -> Iterator:
    """Drop the first ``n`` rows of a stream of [B, d] batches (helper for ``batches(skip)``)."""
    for b in it:
        if n >= len(b):
            n -= len(b)
            continue
        if n:
            b, n = b[n:], 0
        yield b


def _take_rows(it: Iterator, n: int) -> np.ndarray:
    got, parts = 0, []
    for b in it:
        b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float32)
        parts.append(b[: n - got])
        got += len(parts[-1])
        if got >= n:
            break
    if not parts:
        raise InputError("the activation stream is empty")
    return np.concatenate(parts)


def fit(batches: Callable[[int], Iterator], d_in: int, variants: list[Variant], cfg: TrainConfig,
        ckpt=None, on_step: Callable[[int, dict], None] | None = None,
        progress_desc: str = "train SAEs", init_batches: Callable[[int], Iterator] | None = None,
        warm: dict[str, str] | None = None) -> dict[str, tuple[SAE, dict]]:
    """Train ``variants`` on ``batches(0)`` for ``cfg.tokens`` rows; resume from ``ckpt`` (a Store)
    if it holds a checkpoint. Returns {name: (sae in eval mode, last training metrics + tokens/s)}.
    ``init_batches``: where the data-dependent init samples from, when not ``batches`` (a
    data-parallel rank trains on its slice but initialises from the global stream). ``warm``:
    saved SAEs some variants start from (:meth:`MultiTrainer.warm_start`)."""
    tr = MultiTrainer(d_in, variants, cfg)
    if not tr.load_checkpoint(ckpt):
        tr.init_from_data(_take_rows((init_batches or batches)(0), cfg.init_tokens))
        if warm:
            tr.warm_start(warm)
    last: dict[str, dict] = {}
    t0, tok0 = time.perf_counter(), tr.tokens_seen
    with progress(progress_desc, total=cfg.tokens, unit="tok") as p:
        p.advance(tr.tokens_seen)
        if tr.tokens_seen < cfg.tokens:
            for b in batches(tr.tokens_seen):
                b = b[: cfg.tokens - tr.tokens_seen]
                if len(b) == 0:
                    break
                m = tr.step(b)
                for k, v in m.items():
                    last[k] = v
                if m:
                    first = next(iter(m.values()))
                    p.advance(len(b), loss=first["loss"], l0=first["l0"], fvu=first["fvu"])
                else:
                    p.advance(len(b))
                if ckpt is not None and cfg.checkpoint_every and tr.steps % cfg.checkpoint_every == 0:
                    tr.save_checkpoint(ckpt)
                if on_step is not None:
                    on_step(tr.steps, m)
                if tr.tokens_seen >= cfg.tokens:
                    break
    if tr.tokens_seen < cfg.tokens:
        raise SaerayError(f"the activation stream ended after {tr.tokens_seen} of {cfg.tokens} tokens")
    if ckpt is not None:
        tr.save_checkpoint(ckpt)
    dt = time.perf_counter() - t0
    tps = (tr.tokens_seen - tok0) / dt if dt > 0 else 0.0
    out = {}
    for name, sae in tr.saes.items():
        sae.eval()
        out[name] = (sae, {**last.get(name, {}), "tokens": tr.tokens_seen, "tokens_per_s": tps, "lr": tr.lrs[name]})
    return out

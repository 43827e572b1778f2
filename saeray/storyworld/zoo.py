"""The storyworld model zoo: GPT-NeoX models at several sizes, each saved at log-spaced steps.

Layout (like Pythia's revisions; every folder loads with ``from_pretrained``)::

    $SAERAY_CACHE/zoo/<config hash>/
        zoo.json                      configs, loss curves, eval metrics per checkpoint
        storyworld-4l/                the final checkpoint ("main"): config.json, model.safetensors, tokenizer
        storyworld-4l/step0/ ... step<N>/

``from_pretrained(<zoo>/storyworld-4l, subfolder="step64")`` also works, as does
:func:`resolve` ("storyworld-4l", "step64"). All models see the same documents in the same order
(as all Pythia sizes do), one document per context; step 0 is the random initialisation.

The zoo is built once per configuration: the cache key hashes the config together with the
language version, so changing either builds a new zoo. A build writes into a temporary folder
and renames it into place when complete, under a file lock, so concurrent callers (Ray workers,
test sessions) wait for one build instead of racing, and a crash never leaves a zoo that looks
complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError, SaerayError
from .generator import CONTEXT_LEN, Doc, generate_doc, next_token_truth
from .tokenizer import encode, save_tokenizer
from .vocab import BOS, EOS, LANGUAGE_VERSION, PAD, VOCAB, WORD_ID

log = logging.getLogger("saeray.zoo")

ZOO_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """One model size. ``d_mlp`` defaults to 4 * d_model (as in Pythia)."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    lr: float
    d_mlp: int | None = None


@dataclass(frozen=True)
class ZooConfig:
    """What a zoo is; its hash is the cache key. ``threads`` is excluded from the hash: it changes
    speed, and at most float rounding order, never the recipe."""

    models: tuple[ModelSpec, ...] = (
        ModelSpec("storyworld-2l", n_layer=2, d_model=64, n_head=4, lr=4e-3),
        ModelSpec("storyworld-4l", n_layer=4, d_model=128, n_head=4, lr=2e-3),
        ModelSpec("storyworld-6l", n_layer=6, d_model=192, n_head=6, lr=1.5e-3),
    )
    steps: int = 1024
    batch_size: int = 16
    warmup: int = 64
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0                 # corpus seed and torch init seed
    eval_docs: int = 256          # held-out documents scored at every checkpoint
    threads: int | None = field(default=None, compare=False)

    @classmethod
    def tiny(cls) -> "ZooConfig":
        """Two small models, 64 steps, 8 checkpoints each: a few seconds to build; for tests."""
        return cls(
            models=(ModelSpec("storyworld-tiny-1l", n_layer=1, d_model=32, n_head=2, lr=5e-3),
                    ModelSpec("storyworld-tiny-2l", n_layer=2, d_model=64, n_head=4, lr=5e-3)),
            steps=64, batch_size=8, warmup=8, eval_docs=32)

    def checkpoint_steps(self) -> list[int]:
        """0, then powers of two below ``steps``, then ``steps`` (Pythia's early log spacing)."""
        out, s = [0], 1
        while s < self.steps:
            out.append(s)
            s *= 2
        return out + [self.steps]

    def key(self) -> dict:
        d = asdict(self)
        d.pop("threads")
        return {"format": ZOO_FORMAT, "language": LANGUAGE_VERSION, "config": d}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "ZooConfig":
        d = dict(d)
        d["models"] = tuple(ModelSpec(**m) for m in d.get("models", ()))
        return cls(**d)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$SAERAY_CACHE``, else ``~/.cache/saeray``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SAERAY_CACHE") or Path.home() / ".cache" / "saeray")


def zoo_path(config: ZooConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "zoo" / (config or ZooConfig()).hash()


def is_built(config: ZooConfig | None = None, cache_dir: str | Path | None = None) -> bool:
    return (zoo_path(config, cache_dir) / "zoo.json").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_zoo(config: ZooConfig | None = None, progress: bool = True, cache_dir: str | Path | None = None) -> Path:
    """The zoo folder for ``config`` (default: :class:`ZooConfig`), training it first if not cached."""
    cfg = config or ZooConfig()
    final = zoo_path(cfg, cache_dir)
    if (final / "zoo.json").is_file():
        return final
    if "torch" not in sys.modules:
        # Idle OpenMP threads spin by default; on a shared machine that starves the working
        # thread (one 4-layer step measured 17x slower). Only takes effect before torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f"{final.name}.lock"):
        if (final / "zoo.json").is_file():  # another process built it while we waited
            return final
        if final.exists():  # not ours to trust: no index means it never completed
            shutil.rmtree(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(cfg, tmp, progress)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_zoo(config: ZooConfig | None = None, cache_dir: str | Path | None = None) -> dict:
    """The zoo index (``zoo.json``) plus its ``path``; raises if the zoo has not been built."""
    path = zoo_path(config, cache_dir)
    if not (path / "zoo.json").is_file():
        raise SaerayError(f"the storyworld zoo is not built yet (expected {path}); run `saeray zoo build`")
    index = json.loads((path / "zoo.json").read_text())
    index["path"] = str(path)
    return index


def config_for(name: str) -> ZooConfig:
    """The zoo a model name belongs to: the test zoo's ``storyworld-tiny-*`` (seconds to build, so
    specs and tests can audit real checkpoints cheaply), else the default zoo."""
    tiny = ZooConfig.tiny()
    return tiny if name in {m.name for m in tiny.models} else ZooConfig()


def resolve(name: str, revision: str | None = None, config: ZooConfig | None = None,
            cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The folder to pass to ``from_pretrained`` for zoo model ``name`` at ``revision``
    ("step<N>", or None / "main" for the final checkpoint). Builds the zoo if needed."""
    cfg = config or config_for(name)
    names = [m.name for m in cfg.models]
    if name not in names:
        raise InputError(f"unknown storyworld model '{name}'; the zoo has: {', '.join(names)}")
    root = build_zoo(cfg, progress=progress, cache_dir=cache_dir) / name
    if revision in (None, "main"):
        return root
    revs = [f"step{s}" for s in cfg.checkpoint_steps()]
    if revision not in revs:
        raise InputError(f"unknown revision '{revision}' for {name}; use 'main' or one of: {', '.join(revs)}")
    return root / revision


# ---- building --------------------------------------------------------------------------------

def _hf_config(spec: ModelSpec):
    from transformers import GPTNeoXConfig

    # Pythia's choices: parallel residual, rotary on a quarter of each head, untied embeddings, GELU.
    return GPTNeoXConfig(
        vocab_size=len(VOCAB), hidden_size=spec.d_model, num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head, intermediate_size=spec.d_mlp or 4 * spec.d_model,
        max_position_embeddings=CONTEXT_LEN, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0,
        bos_token_id=WORD_ID[BOS], eos_token_id=WORD_ID[EOS], pad_token_id=WORD_ID[PAD], use_cache=False)


def _pack(docs: list[Doc]) -> "tuple[torch.Tensor, torch.Tensor]":
    import torch

    ids = torch.full((len(docs), CONTEXT_LEN), WORD_ID[PAD], dtype=torch.long)
    lens = torch.zeros(len(docs), dtype=torch.long)
    for i, d in enumerate(docs):
        e = encode(d.words)
        ids[i, : len(e)] = torch.tensor(e)
        lens[i] = len(e)
    return ids, lens


@dataclass
class _EvalSet:
    ids: "torch.Tensor"
    lens: "torch.Tensor"
    fact: np.ndarray          # [N, T-1] bool: position i predicts a fact answer at i + 1
    copy: np.ndarray          # [N, T-1] bool: position i predicts a copy target at i + 1
    relation: np.ndarray      # [N, T-1] str of the fact relation ("" elsewhere)
    copy_kind: np.ndarray     # [N, T-1] str
    optimal_loss: float
    n_tokens: int


def _eval_set(cfg: ZooConfig) -> _EvalSet:
    docs = [generate_doc(i, cfg.seed, "heldout") for i in range(cfg.eval_docs)]
    ids, lens = _pack(docs)
    shape = (len(docs), CONTEXT_LEN - 1)
    fact, copy = np.zeros(shape, bool), np.zeros(shape, bool)
    rel, kind = np.full(shape, "", dtype=object), np.full(shape, "", dtype=object)
    nll, n = 0.0, 0
    for i, d in enumerate(docs):
        L = len(d.tokens)
        fact[i, : L - 1] = d.labels["is_fact_answer"][1:]
        copy[i, : L - 1] = d.labels["is_copy_target"][1:]
        rel[i, : L - 1] = d.labels["fact_relation"][1:]
        kind[i, : L - 1] = d.labels["copy_kind"][1:]
        tr = next_token_truth(d)
        nll -= float(np.log(tr.p_next[:-1]).sum())
        n += L - 1
    return _EvalSet(ids, lens, fact, copy, rel, kind, nll / n, n)


def _evaluate(model, ev: _EvalSet, batch: int = 64) -> dict:
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    nll, n_tok = 0.0, 0
    hits_fact, hits_copy = [], []
    with torch.inference_mode():
        for s in range(0, len(ev.ids), batch):
            ids, lens = ev.ids[s: s + batch], ev.lens[s: s + batch]
            T = int(lens.max())
            ids = ids[:, :T]
            logits = model(input_ids=ids).logits[:, :-1].float()
            tgt = ids[:, 1:]
            valid = torch.arange(T - 1)[None, :] < (lens[:, None] - 1)
            lp = F.log_softmax(logits, -1)
            tok_nll = -lp.gather(-1, tgt[..., None])[..., 0]
            nll += float(tok_nll[valid].sum())
            n_tok += int(valid.sum())
            correct = (logits.argmax(-1) == tgt).numpy()
            f, c = ev.fact[s: s + batch, : T - 1], ev.copy[s: s + batch, : T - 1]
            hits_fact.append((correct[f], ev.relation[s: s + batch, : T - 1][f]))
            hits_copy.append((correct[c], ev.copy_kind[s: s + batch, : T - 1][c]))
    if was_training:
        model.train()

    def acc(parts):
        ok = np.concatenate([p[0] for p in parts])
        lab = np.concatenate([p[1] for p in parts])
        by = {str(k): float(ok[lab == k].mean()) for k in sorted(set(lab.tolist()))}
        return (float(ok.mean()) if len(ok) else float("nan")), by

    fact_acc, fact_by = acc(hits_fact)
    copy_acc, copy_by = acc(hits_copy)
    loss = nll / n_tok
    return {"heldout_loss": loss, "excess_loss": loss - ev.optimal_loss, "fact_acc": fact_acc,
            "copy_acc": copy_acc, "fact_acc_by_relation": fact_by, "copy_acc_by_kind": copy_by}


def _lr(cfg: ZooConfig, base: float, step: int) -> float:
    # Linear warm-up, then cosine decay to min_lr_frac of the peak (Pythia's schedule shape).
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return base * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _save(model, folder: Path) -> None:
    model.save_pretrained(str(folder))
    save_tokenizer(folder)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link the files of ``src`` into ``dst`` (the final checkpoint doubles as "main")."""
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _train_one(cfg: ZooConfig, spec: ModelSpec, data: "torch.Tensor", lens: "torch.Tensor", ev: _EvalSet,
               out: Path, show: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXForCausalLM

    from ..progress import progress as progress_bar

    torch.manual_seed(cfg.seed)
    model = GPTNeoXForCausalLM(_hf_config(spec))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    ckpts = set(cfg.checkpoint_steps())
    records, curve = [], []
    seen_tokens = 0
    t0 = time.perf_counter()
    ctx = progress_bar(f"zoo: train {spec.name}", total=cfg.steps, unit="step") if show else contextlib.nullcontext()
    with ctx as bar:
        model.train()
        for step in range(cfg.steps + 1):
            if step in ckpts:
                folder = out / spec.name / f"step{step}"
                _save(model, folder)
                m = _evaluate(model, ev)
                m.update(step=step, revision=f"step{step}", path=f"{spec.name}/step{step}", train_tokens=seen_tokens)
                records.append(m)
                log.info("zoo: %s step %d: held-out loss %.3f (optimal %.3f), fact acc %.3f, copy acc %.3f",
                         spec.name, step, m["heldout_loss"], ev.optimal_loss, m["fact_acc"], m["copy_acc"])
            if step == cfg.steps:
                break
            lo, hi = step * cfg.batch_size, (step + 1) * cfg.batch_size
            ids, ln = data[lo:hi], lens[lo:hi]
            T = int(ln.max())
            ids = ids[:, :T]
            tgt = ids[:, 1:].clone()
            tgt[torch.arange(T - 1)[None, :] >= (ln[:, None] - 1)] = -100
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, spec.lr, step)
            logits = model(input_ids=ids).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            seen_tokens += int((ln - 1).sum())
            loss_f = float(loss.detach())
            curve.append([step + 1, round(loss_f, 5)])
            if bar is not None:
                bar.advance(1, loss=loss_f)
    _link_tree(out / spec.name / f"step{cfg.steps}", out / spec.name)
    final = records[-1]
    return {
        "spec": asdict(spec), "n_params": n_params, "path": spec.name, "final_step": cfg.steps,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "hf_config": {k: v for k, v in model.config.to_dict().items()
                      if k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings", "rotary_pct", "use_parallel_residual",
                               "tie_word_embeddings", "hidden_act")},
        "train_loss": curve,
        "checkpoints": records,
        "final": {k: final[k] for k in ("heldout_loss", "excess_loss", "fact_acc", "copy_acc")},
    }


def _build(cfg: ZooConfig, out: Path, show: bool) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint is noise

    t0, c0 = time.perf_counter(), time.process_time()
    out.mkdir(parents=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        n_docs = cfg.steps * cfg.batch_size
        log.info("zoo %s: generating %d training and %d held-out documents", cfg.hash(), n_docs, cfg.eval_docs)
        docs = [generate_doc(i, cfg.seed, "train") for i in range(n_docs)]
        data, lens = _pack(docs)
        del docs
        ev = _eval_set(cfg)
        t_data = time.perf_counter() - t0
        models = {}
        for spec in cfg.models:
            models[spec.name] = _train_one(cfg, spec, data, lens, ev, out, show)
            f = models[spec.name]["final"]
            log.info("zoo: %s done: held-out loss %.3f (optimal %.3f), fact acc %.3f, copy acc %.3f",
                     spec.name, f["heldout_loss"], ev.optimal_loss, f["fact_acc"], f["copy_acc"])
    finally:
        torch.set_num_threads(prev_threads)
    index = {
        "format": ZOO_FORMAT, "language": LANGUAGE_VERSION, "hash": cfg.hash(), "config": cfg.key()["config"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - t0, 1), "data_seconds": round(t_data, 1),
        # CPU seconds of this process: with a shared machine, cpu_seconds / threads estimates the
        # wall time the build would take on an idle one.
        "cpu_seconds": round(time.process_time() - c0, 1),
        "threads": cfg.threads or os.cpu_count() or 1, "torch": torch.__version__,
        "checkpoint_steps": cfg.checkpoint_steps(),
        "eval": {"split": "heldout", "docs": cfg.eval_docs, "tokens": ev.n_tokens, "optimal_loss": ev.optimal_loss,
                 "fact_positions": int(ev.fact.sum()), "copy_positions": int(ev.copy.sum())},
        "models": models,
    }
    (out / "zoo.json").write_text(json.dumps(index, indent=1) + "\n")


def summary_rows(index: dict) -> list[dict]:
    """One row per (model, checkpoint) with the headline metrics (what ``saeray zoo list`` shows)."""
    rows = []
    for name, m in index["models"].items():
        for c in m["checkpoints"]:
            rows.append({"model": name, "revision": c["revision"], "step": c["step"], "params": m["n_params"],
                         "heldout_loss": c["heldout_loss"], "excess_loss": c["excess_loss"],
                         "fact_acc": c["fact_acc"], "copy_acc": c["copy_acc"]})
    return rows



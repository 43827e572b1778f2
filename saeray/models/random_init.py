"""Random-init models of any supported family and shape, for tests and benchmarks.

No model hub is reachable here, so shapes of real models (e.g. GPT-2 small for the harvest
benchmark) are reproduced with random weights: the forward cost depends on the shape only.
The folders written by :func:`save_random_model` load through :func:`saeray.models.load_model`
and :meth:`saeray.models.shard.Stage.from_pretrained` like any checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

GPT2_SMALL = dict(family="gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, vocab_size=50257, n_ctx=1024)
PYTHIA_70M = dict(family="gpt_neox", n_layers=6, d_model=512, n_heads=8, d_mlp=2048, vocab_size=50304, n_ctx=2048)

FAMILY_NAMES = ("gpt_neox", "gpt2", "llama", "qwen2", "mistral")


def random_config(family: str, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, d_mlp: int | None = None,
                  vocab_size: int = 128, n_ctx: int = 256, **overrides: Any) -> Any:
    """A transformers config of the given family and shape; ``overrides`` go to the config verbatim."""
    import transformers as tf

    d_mlp = d_mlp or 4 * d_model
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=d_mlp, max_position_embeddings=n_ctx, **common, **overrides)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, n_positions=n_ctx,
                            **common, **overrides)
    elif family in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
        cfg = cls(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  intermediate_size=d_mlp, max_position_embeddings=n_ctx, **common, **overrides)
    else:
        raise InputError(f"unknown family '{family}' for a random model; use one of {', '.join(FAMILY_NAMES)}")
    return cfg


def random_model(family: str, *, seed: int = 0, **shape: Any) -> Any:
    """A random-init causal LM (eval mode, frozen) of the given family and shape."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(random_config(family, **shape))
    model.eval()
    model.requires_grad_(False)
    return model


def save_random_model(path: str | Path, family: str, *, seed: int = 0, **shape: Any) -> Path:
    """Write a random-init model folder (config.json + model.safetensors) and return its path."""
    path = Path(path)
    random_model(family, seed=seed, **shape).save_pretrained(path)
    return path

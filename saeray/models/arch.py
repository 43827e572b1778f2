"""A uniform view of a decoder-only transformer, whatever its Hugging Face family.

Every supported family is one :class:`Family` record: the attribute names under which the
Hugging Face classes keep their embeddings, blocks, attention, MLP, norms and unembedding. There
is no class hierarchy; :func:`view` reads a model (or a :class:`~saeray.models.shard.Stage`)
through its family record and returns an :class:`Arch`, whose accessors give modules and weights
by global layer index.

Weights are returned in "math" orientation, the way the residual stream reads them (``x @ W``),
as views of the model's own parameters (no copy):

=========  ===========================  ==================================================
accessor   shape                        meaning
=========  ===========================  ==================================================
W_E        [d_vocab, d_model]           token embedding
W_U        [d_model, d_vocab]           unembedding (``lm_head``), applied after final norm
W_in(L)    [d_model, d_mlp]             MLP input weights (for gated MLPs: the linear "up"
                                        path; the gate is ``W_gate``, as in TransformerLens)
W_gate(L)  [d_model, d_mlp] or None     gate weights of a gated (SwiGLU) MLP
W_out(L)   [d_mlp, d_model]             MLP output weights: row i is neuron i's write
W_O(L)     [n_heads, d_head, d_model]   attention output weights, split per head
=========  ===========================  ==================================================

GPT-2 keeps its projections as ``Conv1D`` (weights stored [in, out]); the others use
``nn.Linear`` (stored [out, in]). The accessors hide that difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class Family:
    """Where one Hugging Face family keeps each part (attribute paths, dotted)."""

    name: str
    model_types: tuple[str, ...]   # config.model_type values served by this record
    base: str                      # the base model under the *ForCausalLM wrapper
    embed: str
    pos_embed: str | None          # learned absolute positions (GPT-2) or None
    rotary: str | None             # rotary-embedding module on the base model (NeoX, Llama)
    layers: str
    final_norm: str
    unembed: str
    ln_attn: str                   # norm before attention, inside a block
    ln_mlp: str                    # norm before the MLP, inside a block
    attn: str                      # attention module, inside a block
    attn_o: str                    # output projection, inside the attention module
    mlp: str
    mlp_in: str                    # inside the MLP module
    mlp_gate: str | None
    mlp_out: str
    conv1d: bool                   # projections stored [in, out] (GPT-2 Conv1D)


GPT_NEOX = Family(
    name="gpt_neox", model_types=("gpt_neox",), base="gpt_neox", embed="embed_in", pos_embed=None,
    rotary="rotary_emb", layers="layers", final_norm="final_layer_norm", unembed="lm_head",
    ln_attn="input_layernorm", ln_mlp="post_attention_layernorm", attn="attention", attn_o="dense",
    mlp="mlp", mlp_in="dense_h_to_4h", mlp_gate=None, mlp_out="dense_4h_to_h", conv1d=False,
)
GPT2 = Family(
    name="gpt2", model_types=("gpt2",), base="transformer", embed="wte", pos_embed="wpe",
    rotary=None, layers="h", final_norm="ln_f", unembed="lm_head",
    ln_attn="ln_1", ln_mlp="ln_2", attn="attn", attn_o="c_proj",
    mlp="mlp", mlp_in="c_fc", mlp_gate=None, mlp_out="c_proj", conv1d=True,
)
LLAMA = Family(
    name="llama", model_types=("llama", "qwen2", "mistral"), base="model", embed="embed_tokens", pos_embed=None,
    rotary="rotary_emb", layers="layers", final_norm="norm", unembed="lm_head",
    ln_attn="input_layernorm", ln_mlp="post_attention_layernorm", attn="self_attn", attn_o="o_proj",
    mlp="mlp", mlp_in="up_proj", mlp_gate="gate_proj", mlp_out="down_proj", conv1d=False,
)

FAMILIES: tuple[Family, ...] = (GPT_NEOX, GPT2, LLAMA)


def supported_help() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def family_of(config: Any) -> Family:
    """The family record for a transformers config; InputError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise InputError(
        f"unsupported model architecture '{model_type}' ({', '.join(getattr(config, 'architectures', None) or [])}); "
        f"supported families: {supported_help()}"
    )


def get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _math(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """[in, out] view of a projection weight."""
    return weight if conv1d else weight.T


@dataclass
class Arch:
    """A model (or a contiguous slice of one) seen through its family record.

    ``blocks`` maps *global* layer index to block module; a shard stage holds only its own layers,
    while ``n_layers`` is always the full model's depth. ``embed``/``pos_embed`` are present only where
    the embedding lives (first stage), ``final_norm``/``unembed`` only where the head lives (last stage).
    """

    family: Family
    config: Any
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    parallel_residual: bool          # GPT-NeoX/Pythia: attn and MLP both read resid_pre
    blocks: dict[int, nn.Module]
    embed: nn.Module | None = None
    pos_embed: nn.Module | None = None
    rotary: nn.Module | None = None
    final_norm: nn.Module | None = None
    unembed: nn.Module | None = None
    layers: range = field(init=False)

    def __post_init__(self) -> None:
        keys = sorted(self.blocks)
        self.layers = range(keys[0], keys[-1] + 1) if keys else range(0)

    # modules ---------------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        if layer not in self.blocks:
            raise InputError(f"layer {layer} is not held here (this {self.family.name} model part holds layers "
                             f"{self.layers.start}..{self.layers.stop - 1} of {self.n_layers})")
        return self.blocks[layer]

    def attn(self, layer: int) -> nn.Module:
        return get(self.block(layer), self.family.attn)

    def attn_o(self, layer: int) -> nn.Module:
        return get(self.attn(layer), self.family.attn_o)

    def mlp(self, layer: int) -> nn.Module:
        return get(self.block(layer), self.family.mlp)

    def mlp_out(self, layer: int) -> nn.Module:
        return get(self.mlp(layer), self.family.mlp_out)

    def ln_attn(self, layer: int) -> nn.Module:
        return get(self.block(layer), self.family.ln_attn)

    def ln_mlp(self, layer: int) -> nn.Module:
        return get(self.block(layer), self.family.ln_mlp)

    # weights (views, [in, out]) ---------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        if self.embed is None:
            raise InputError("the token embedding is not held here (it lives in the first stage)")
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        if self.unembed is None:
            raise InputError("the unembedding is not held here (it lives in the last stage)")
        return self.unembed.weight.T

    def W_in(self, layer: int) -> torch.Tensor:
        return _math(get(self.mlp(layer), self.family.mlp_in).weight, self.family.conv1d)

    def b_in(self, layer: int) -> torch.Tensor | None:
        return get(self.mlp(layer), self.family.mlp_in).bias

    def W_gate(self, layer: int) -> torch.Tensor | None:
        if self.family.mlp_gate is None:
            return None
        return _math(get(self.mlp(layer), self.family.mlp_gate).weight, self.family.conv1d)

    def W_out(self, layer: int) -> torch.Tensor:
        return _math(self.mlp_out(layer).weight, self.family.conv1d)

    def b_out(self, layer: int) -> torch.Tensor | None:
        return self.mlp_out(layer).bias

    def W_O(self, layer: int) -> torch.Tensor:
        return _math(self.attn_o(layer).weight, self.family.conv1d).view(self.n_heads, self.d_head, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        return self.attn_o(layer).bias


def _dims(family: Family, config: Any, any_block: nn.Module | None) -> dict[str, int]:
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    if family.name == "gpt2":
        d_mlp = config.n_inner or 4 * d_model
    else:
        d_mlp = config.intermediate_size
    if any_block is not None:  # trust the modules over the config where they disagree
        o = get(get(any_block, family.attn), family.attn_o)
        d_in = o.weight.shape[0] if family.conv1d else o.weight.shape[1]
        d_head = d_in // n_heads
        m = get(get(any_block, family.mlp), family.mlp_out)
        d_mlp = m.weight.shape[0] if family.conv1d else m.weight.shape[1]
    return dict(
        n_layers=config.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_model=d_model, d_head=d_head, d_mlp=d_mlp, d_vocab=config.vocab_size,
    )


def make_arch(family: Family, config: Any, blocks: dict[int, nn.Module], **parts: nn.Module | None) -> Arch:
    first = next(iter(blocks.values()), None)
    return Arch(family=family, config=config, blocks=blocks,
                parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
                **_dims(family, config, first), **parts)


def view(model: Any) -> Arch:
    """The :class:`Arch` of a Hugging Face causal LM or of a shard stage."""
    if isinstance(getattr(model, "arch", None), Arch):
        return model.arch
    config = getattr(model, "config", None)
    if config is None:
        raise InputError(f"{type(model).__name__} is not a Hugging Face model (no .config); "
                         f"load one with saeray.models.load_model")
    fam = family_of(config)
    base = getattr(model, fam.base, None)
    unembed = getattr(model, fam.unembed, None)
    if base is None or unembed is None:
        raise InputError(f"{type(model).__name__} is not a causal LM of the {fam.name} family "
                         f"(expected .{fam.base} and .{fam.unembed}); load it with AutoModelForCausalLM / load_model")
    layers = get(base, fam.layers)
    return make_arch(
        fam, config, {i: b for i, b in enumerate(layers)},
        embed=get(base, fam.embed),
        pos_embed=get(base, fam.pos_embed) if fam.pos_embed else None,
        rotary=get(base, fam.rotary) if fam.rotary else None,
        final_norm=get(base, fam.final_norm),
        unembed=unembed,
    )

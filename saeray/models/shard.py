"""Split a causal LM into contiguous layer-range stages that can live in different processes/GPUs.

A :class:`Stage` holds blocks ``[start, stop)``; the first also holds the embeddings, the last the
final norm and unembedding. Composing the stages in order reproduces the whole model's forward
(tested to float32 precision for every family). Each stage emits the hook points of its own layers
and accepts interventions on them (see :mod:`saeray.models.hooks`).

Two ways to get stages:

* :func:`split` cuts a loaded model; the stages share its parameters (no copy) - for tests and for
  one process that wants several stages;
* :meth:`Stage.from_pretrained` builds one stage from the checkpoint in another process (a Ray
  actor): the architecture is instantiated on the ``meta`` device, only this stage's modules are
  materialised, and only their tensors are read from the safetensors files (sharded checkpoints
  included), so the other layers' weights never enter this process's memory.

What crosses a stage boundary is the hidden state [batch, pos, d_model] plus the caller's
``attention_mask`` / ``position_ids`` (if any). Each stage rebuilds what its blocks need from
those: the causal (and sliding-window, for Qwen2/Mistral layer types) mask through transformers'
own ``create_causal_mask``, and rotary position embeddings from its own copy of the model's rotary
module - exactly as the Hugging Face forward does, so the results match it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError, SaerayError
from .arch import Arch, Family, make_arch, view
from .hooks import Intervention, run_with
from .hookpoints import expand


@dataclass
class StageOutput:
    """``output``: hidden states [batch, pos, d_model] (resid_post of the stage's last block) or, for
    the last stage with ``logits=True``, logits [batch, pos, d_vocab]. ``acts``: hook point name ->
    activation [batch, pos, width] for the captured points of this stage's layers."""

    output: torch.Tensor
    acts: dict[str, torch.Tensor] = field(default_factory=dict)


def _layer_type(config: Any, layer: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    # Mistral keeps a model-wide sliding window instead of per-layer types.
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


class Stage(nn.Module):
    """Blocks ``[start, stop)`` of a causal LM (+ embeddings if first, + final norm and unembedding if last)."""

    def __init__(self, config: Any, family: Family, layer_range: tuple[int, int], blocks: Sequence[nn.Module], *,
                 embed: nn.Module | None = None, pos_embed: nn.Module | None = None, rotary: nn.Module | None = None,
                 final_norm: nn.Module | None = None, unembed: nn.Module | None = None) -> None:
        super().__init__()
        start, stop = layer_range
        n = config.num_hidden_layers
        if not (0 <= start < stop <= n) or len(blocks) != stop - start:
            raise InputError(f"layer range [{start}, {stop}) is not a non-empty range within the model's {n} layers")
        self.config, self.family, self.start, self.stop = config, family, start, stop
        self.is_first, self.is_last = start == 0, stop == n
        if self.is_first and embed is None:
            raise InputError("the first stage needs the token embedding")
        if self.is_last and (final_norm is None or unembed is None):
            raise InputError("the last stage needs the final norm and the unembedding")
        self.embed, self.pos_embed = embed, pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.final_norm, self.unembed = final_norm, unembed
        self._layer_types = {L: _layer_type(config, L) for L in range(start, stop)}

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.start, self.stop

    @property
    def arch(self) -> Arch:
        return make_arch(self.family, self.config, {self.start + i: b for i, b in enumerate(self.blocks)},
                         embed=self.embed, pos_embed=self.pos_embed, rotary=self.rotary,
                         final_norm=self.final_norm, unembed=self.unembed)

    def extra_repr(self) -> str:
        return f"family={self.family.name}, layers=[{self.start}, {self.stop}), first={self.is_first}, last={self.is_last}"

    # ---- forward ---------------------------------------------------------------------------
    def _masks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
        masks: dict[str, Any] = {}
        for t in set(self._layer_types.values()):
            masks[t] = create_sliding_window_causal_mask(**kw) if t == "sliding_attention" else create_causal_mask(**kw)
        return masks

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, capture: Iterable[str] = (),
                interventions: Mapping[str, Intervention] | None = None, logits: bool = True,
                detach: bool = True, start_layer: int | None = None) -> StageOutput:
        """Run this stage.

        inputs: token ids [batch, pos] (first stage) or hidden states [batch, pos, d_model] (others).
        attention_mask: optional [batch, pos] padding mask (1 = real token), the same for every stage.
        position_ids: optional [batch, pos] or [1, pos]; default ``arange(pos)`` as in transformers.
        capture / interventions: hook point names of this stage's layers (globs expand to them).
        logits: the last stage returns logits; with ``logits=False`` it skips the final norm and
            unembedding and returns its last block's hidden states, like the other stages.
        start_layer: run from block ``start_layer`` of this stage on, ``inputs`` being the hidden
            states entering it (``resid_pre.<start_layer>`` of an earlier pass of the same batch):
            a pass that changes nothing before that layer need not recompute the layers before it.
        """
        first = 0
        if start_layer is not None:
            if not self.start <= start_layer < self.stop:
                raise InputError(f"start_layer {start_layer} is not within this stage's layers [{self.start}, {self.stop})")
            if not inputs.is_floating_point() or inputs.dim() != 3:
                raise InputError(f"start_layer {start_layer} takes the hidden states entering that block "
                                 f"[batch, pos, d_model], got {tuple(inputs.shape)} {inputs.dtype}")
            hidden, first = inputs, start_layer - self.start
        elif self.is_first:
            if inputs.is_floating_point():
                raise InputError("the first stage takes token ids [batch, pos], got a floating-point tensor")
            hidden = self.embed(inputs)
        else:
            if not inputs.is_floating_point() or inputs.dim() != 3:
                raise InputError(f"stage [{self.start}, {self.stop}) takes hidden states [batch, pos, d_model] "
                                 f"from the previous stage, got {tuple(inputs.shape)} {inputs.dtype}")
            hidden = inputs
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if self.is_first and self.pos_embed is not None and start_layer is None:
            hidden = hidden + self.pos_embed(position_ids)
        masks = self._masks(hidden, attention_mask, position_ids)
        extra: dict[str, Any] = {}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(hidden, position_ids)
        with run_with(self, capture, interventions, detach=detach) as acts:
            for i in range(first, len(self.blocks)):
                hidden = self.blocks[i](hidden, attention_mask=masks[self._layer_types[self.start + i]],
                               position_ids=position_ids, **extra)
                if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                    hidden = hidden[0]
            if self.is_last and logits:
                hidden = self.unembed(self.final_norm(hidden))
        return StageOutput(hidden, dict(acts))

    # ---- construction from a checkpoint ----------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, layer_range: tuple[int, int], *,
                        revision: str | None = None, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> "Stage":
        """Build the stage for ``layer_range`` = (start, stop) reading only its own tensors from safetensors."""
        from transformers import AutoModelForCausalLM

        from .load import load_config, parse_dtype, resolve

        config = load_config(name_or_path, revision, trust_remote_code)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        path, rev = resolve(name_or_path, revision)
        torch_dtype = parse_dtype(dtype, config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        config = skeleton.config  # carries the resolved attention implementation
        start, stop = layer_range
        full = view(skeleton)
        if not (0 <= start < stop <= full.n_layers):
            raise InputError(f"layer range [{start}, {stop}) is not within the model's {full.n_layers} layers")
        first, last = start == 0, stop == full.n_layers
        stage = cls(config, full.family, (start, stop), [full.blocks[L] for L in range(start, stop)],
                    embed=full.embed if first else None,
                    pos_embed=full.pos_embed if first else None,
                    final_norm=full.final_norm if last else None,
                    unembed=full.unembed if last else None)
        names = {id(m): n for n, m in skeleton.named_modules()}
        sources = {}  # stage state-dict key -> checkpoint key
        for key in stage.state_dict():
            child, rest = key.split(".", 1)
            module = getattr(stage, child)
            if child == "blocks":
                idx, rest = rest.split(".", 1)
                module = module[int(idx)]
            sources[key] = f"{names[id(module)]}.{rest}"
        unloaded = [n for n, _ in stage.named_buffers() if n not in sources]
        if unloaded:  # non-persistent buffers would come out of to_empty() uninitialised
            raise SaerayError(f"cannot build a {full.family.name} stage from the checkpoint: buffers "
                              f"{', '.join(unloaded)} are not stored in it")
        rotary_cls = type(full.rotary) if full.rotary is not None else None
        tensors = _read_tensors(skeleton, path, rev, sources, config, stage.family)
        del skeleton, full
        stage.to(dtype=torch_dtype)  # still on meta: free
        stage.to_empty(device=device)
        stage.load_state_dict(tensors, strict=True)
        if rotary_cls is not None:
            # Rotary buffers are computed, not stored (non-persistent), and stay float32 as in transformers.
            stage.rotary = rotary_cls(config=config).to(device)
        stage.eval()
        stage.requires_grad_(False)
        return stage


def _checkpoint_files(path: str, revision: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(checkpoint key -> file name, file name -> local file) of model.safetensors or a sharded index."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(fname: str) -> str | None:
        return cached_file(path, fname, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    index_file = fetch("model.safetensors.index.json")
    if index_file is not None:
        weight_map: dict[str, str] = json.loads(Path(index_file).read_text())["weight_map"]
        return weight_map, {f: fetch(f) for f in set(weight_map.values())}
    single = fetch("model.safetensors")
    if single is None:
        raise InputError(f"model '{path}' has no model.safetensors (or model.safetensors.index.json); "
                         f"saeray only loads safetensors weights")
    with safe_open(single, framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}, {"model.safetensors": single}


def _model_to_checkpoint_keys(skeleton: nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, applying transformers' own key renamings.

    Checkpoints do not always use the module names: Pythia stores the unembedding as ``embed_out``,
    original GPT-2 files drop the ``transformer.`` prefix, old files say ``gamma``/``beta``. We reuse
    transformers' conversion mapping (the one ``from_pretrained`` applies) so both paths agree; a
    checkpoint that needs a tensor-merging conversion, not just a rename, is refused below.
    """
    meta_sd = skeleton.state_dict()
    out: dict[str, str] = {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without the conversion machinery: names are used as stored
        for k in checkpoint_keys:
            for cand in (k, f"{skeleton.base_model_prefix}.{k}"):
                if cand in meta_sd:
                    out.setdefault(cand, k)
        return out
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    for k in checkpoint_keys:
        new, pattern = rename_source_key(k, renamings, converters, base_model_prefix=skeleton.base_model_prefix,
                                         meta_state_dict=meta_sd)
        if pattern is not None:
            continue  # needs a tensor conversion: left unmapped, reported as missing if this stage needs it
        out.setdefault(new, k)
    return out


def _read_tensors(skeleton: nn.Module, path: str, revision: str | None, sources: dict[str, str],
                  config: Any, family: Family) -> dict[str, torch.Tensor]:
    """Read exactly the tensors named in ``sources`` (stage key -> model key); safetensors mmap, nothing else."""
    from safetensors import safe_open

    weight_map, files = _checkpoint_files(path, revision)
    to_ckpt = _model_to_checkpoint_keys(skeleton, weight_map)
    embed_key = f"{family.base}.{family.embed}.weight"

    def locate(model_key: str) -> str | None:
        if model_key in to_ckpt:
            return to_ckpt[model_key]
        if model_key == f"{family.unembed}.weight" and getattr(config, "tie_word_embeddings", False):
            return to_ckpt.get(embed_key)
        return None

    wanted = {k: locate(v) for k, v in sources.items()}
    missing = [sources[k] for k, v in wanted.items() if v is None]
    if missing:
        raise SaerayError(f"checkpoint '{path}' lacks tensors this stage needs: {', '.join(missing[:8])}"
                          f"{' ...' if len(missing) > 8 else ''}")
    by_file: dict[str, list[str]] = {}
    for k, ck in wanted.items():
        by_file.setdefault(weight_map[ck], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for fname, keys in by_file.items():
        with safe_open(files[fname], framework="pt") as f:
            for k in keys:
                out[k] = f.get_tensor(wanted[k])
    return out


def check_boundaries(boundaries: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """Layer ranges for cut points, e.g. [2, 3] on 4 layers -> [(0, 2), (2, 3), (3, 4)]."""
    cuts = [int(b) for b in boundaries]
    if any(not 0 < b < n_layers for b in cuts) or cuts != sorted(set(cuts)):
        raise InputError(f"stage boundaries {list(boundaries)} must be strictly increasing layer indices in "
                         f"1..{n_layers - 1} (the model has {n_layers} layers)")
    edges = [0, *cuts, n_layers]
    return list(zip(edges[:-1], edges[1:]))


def split(model: Any, boundaries: Sequence[int]) -> list[Stage]:
    """Cut a loaded model at ``boundaries`` (layer indices where a new stage starts); shares its parameters."""
    arch = view(model)
    ranges = check_boundaries(boundaries, arch.n_layers)
    stages = []
    for start, stop in ranges:
        first, last = start == 0, stop == arch.n_layers
        stages.append(Stage(arch.config, arch.family, (start, stop), [arch.blocks[L] for L in range(start, stop)],
                            embed=arch.embed if first else None, pos_embed=arch.pos_embed if first else None,
                            rotary=arch.rotary, final_norm=arch.final_norm if last else None,
                            unembed=arch.unembed if last else None))
    return stages


def even_boundaries(n_layers: int, n_stages: int) -> list[int]:
    """Cut points giving ``n_stages`` stages of (nearly) equal depth."""
    if not 1 <= n_stages <= n_layers:
        raise InputError(f"cannot split {n_layers} layers into {n_stages} stages")
    return [round(i * n_layers / n_stages) for i in range(1, n_stages)]


def route(names: Iterable[str], ranges: Sequence[tuple[int, int]], n_layers: int, n_heads: int) -> list[list[str]]:
    """Distribute hook point names (globs allowed) to the stages whose layers hold them."""
    points = expand(list(names), n_layers, n_heads)
    return [[hp.name for hp in points if a <= hp.layer < b] for a, b in ranges]


def read_unembedding(ref) -> torch.Tensor:
    """W_U [d_model, vocab] of a model (a ModelRef) as float32, read alone from its safetensors (the
    feature dashboards' logit lens needs nothing else of the model)."""
    from .load import resolve

    skeleton = ref.meta_model()
    names = {id(m): n for n, m in skeleton.named_modules()}
    full = view(skeleton)
    path, rev = resolve(ref.path, ref.revision)
    key = f"{names[id(full.unembed)]}.weight"
    w = _read_tensors(skeleton, path, rev, {"w": key}, skeleton.config, full.family)["w"]
    return w.float().T.contiguous()

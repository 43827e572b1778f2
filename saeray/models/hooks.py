"""Capture and intervene at named hook points with plain PyTorch module hooks.

Each hook point (see :mod:`saeray.models.hookpoints`) maps to one module of the family (see
``docs/hookpoints.md``):

==================  ===================================================================
resid_pre.L         forward pre-hook on block L (its input hidden states)
resid_post.L        forward hook on block L (its output hidden states)
attn_out.L          forward hook on the attention module (output[0]: after W_O, + b_O)
mlp_out.L           forward hook on the MLP module
mlp_post.L          forward pre-hook on the MLP output projection: its input is the neuron
                    activations (act(x W_in) for NeoX/GPT-2; act(x W_gate) * (x W_in) for
                    gated Llama-style MLPs)
attn_head_out.L.H   forward hook on the attention output projection: head H's part
                    z_H @ W_O[H] of its output, computed from the projection's input z
==================  ===================================================================

Per-head outputs carry no bias: ``sum_H attn_head_out.L.H + b_O == attn_out.L``.

Semantics (choices recorded here):

* A capture at a hook point records the activation *as it arrives* there, before an intervention
  at that same point; every hook point downstream sees the intervention.
* Captured tensors are the model's own tensors (``.detach()``-ed views when ``detach=True``), not
  copies: the forward never writes to them afterwards, so they stay valid after the pass; callers
  that modify them in place must ``clone()`` first. Per-head captures are fresh tensors (one einsum
  per layer for all requested heads, laid out [head, batch, pos, d_model] so each head is contiguous).
* An intervention is any ``f(act) -> act`` returning a tensor of the same shape; it runs inside the
  forward, so gradients flow through it when the forward is not under ``torch.inference_mode()``.
  ``zero_ablate``, ``mean_ablate`` and ``add`` build the common ones; an SAE reconstruction is
  ``lambda x: sae.decode(sae.encode(x))``.
* Hooks are registered for the duration of :func:`run_with` only and only for the requested points;
  there is no per-token Python work, so the overhead is a few dict writes per layer.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..errors import InputError
from .arch import Arch, view
from .hookpoints import KINDS, HookPoint, HookPointError, all_names, expand

Intervention = Callable[[torch.Tensor], torch.Tensor]


# ---- interventions ---------------------------------------------------------------------------

def _at(positions: torch.Tensor | None, new: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    if positions is None:
        return new
    mask = positions.to(device=act.device, dtype=torch.bool)
    return torch.where(mask[..., None], new, act)


def zero_ablate(positions: torch.Tensor | None = None) -> Intervention:
    """Set the activation to zero (at ``positions``: a bool mask broadcastable to [batch, pos])."""
    def f(act: torch.Tensor) -> torch.Tensor:
        return _at(positions, torch.zeros_like(act), act)
    return f


def mean_ablate(mean: torch.Tensor, positions: torch.Tensor | None = None) -> Intervention:
    """Replace the activation by ``mean`` (a [d] vector, or anything broadcastable to the activation)."""
    def f(act: torch.Tensor) -> torch.Tensor:
        return _at(positions, mean.to(device=act.device, dtype=act.dtype).expand_as(act), act)
    return f


def add(vector: torch.Tensor, scale: float = 1.0, positions: torch.Tensor | None = None) -> Intervention:
    """Steering: add ``scale * vector`` to the activation (Turner et al. 2023, activation addition)."""
    def f(act: torch.Tensor) -> torch.Tensor:
        return _at(positions, act + scale * vector.to(device=act.device, dtype=act.dtype), act)
    return f


# ---- names -----------------------------------------------------------------------------------

def valid_names(arch: Arch) -> list[str]:
    """Every concrete hook point this model (or stage) holds, heads shown as a range."""
    return [n for n in all_names(arch.n_layers, arch.n_heads) if int(n.split(".")[1]) in arch.layers]


def describe_valid(arch: Arch) -> str:
    """The valid hook points for an error message: all of them, or as ranges for deep models."""
    names = valid_names(arch)
    if len(names) <= 64:
        return ", ".join(names)
    a, b = arch.layers.start, arch.layers.stop - 1
    kinds = ", ".join(f"{k}.L" for k in KINDS if k != "attn_head_out")
    return f"{kinds} and attn_head_out.L.H for L in {a}..{b}, H in 0..{arch.n_heads - 1}"


def resolve(model: Any, names: Iterable[str]) -> list[HookPoint]:
    """Parse names (globs allowed) against a model or stage. Globs expand to the layers held here.

    InputError for a malformed name, or a layer/head this model (part) does not have; the message
    lists the valid hook points.
    """
    arch = model if isinstance(model, Arch) else view(model)
    names = [names] if isinstance(names, str) else list(names)
    out: list[HookPoint] = []
    for name in names:
        try:
            points = expand([name], arch.n_layers, arch.n_heads)
        except HookPointError as e:
            raise InputError(f"{e}. Valid hook points here: {describe_valid(arch)}") from None
        if name.split(".")[1] == "*":
            points = [hp for hp in points if hp.layer in arch.layers]
        elif points[0].layer not in arch.layers:
            raise InputError(f"hook point '{name}' is in layer {points[0].layer}, which this stage does not hold "
                             f"(it holds layers {arch.layers.start}..{arch.layers.stop - 1}); "
                             f"valid hook points here: {describe_valid(arch)}")
        out.extend(hp for hp in points if hp not in out)
    return out


def width(model: Any, hp: HookPoint | str) -> int:
    """Number of features at a hook point: d_mlp for mlp_post, d_model otherwise."""
    arch = model if isinstance(model, Arch) else view(model)
    hp = resolve(arch, [hp if isinstance(hp, str) else hp.name])[0]
    return arch.d_mlp if hp.kind == "mlp_post" else arch.d_model


# ---- hooks -----------------------------------------------------------------------------------

def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _with_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _output_hook(name: str | None, fn: Intervention | None, cache: dict, detach: bool):
    def hook(module, args, output):
        act = _first(output)
        if name is not None:
            cache[name] = act.detach() if detach else act
        if fn is not None:
            return _with_first(output, fn(act))
        return None
    return hook


def _input_hook(name: str | None, fn: Intervention | None, cache: dict, detach: bool):
    # Blocks are called with hidden states as the first positional argument in all three families.
    def hook(module, args):
        act = args[0]
        if name is not None:
            cache[name] = act.detach() if detach else act
        if fn is not None:
            return (fn(act), *args[1:])
        return None
    return hook


def _heads_hook(arch: Arch, layer: int, capture: list[int], edits: dict[int, Intervention], cache: dict, detach: bool):
    heads = sorted(set(capture) | set(edits))
    idx = torch.tensor(heads)

    def hook(module, args, output):
        z = args[0]
        W_O = arch.W_O(layer)
        zh = z.unflatten(-1, (arch.n_heads, arch.d_head))
        if len(heads) == arch.n_heads:
            per = torch.einsum("bthe,hed->hbtd", zh, W_O)
        else:
            i = idx.to(z.device)
            per = torch.einsum("bthe,hed->hbtd", zh.index_select(-2, i), W_O.index_select(0, i))
        for k, h in enumerate(heads):
            if h in capture:
                cache[f"attn_head_out.{layer}.{h}"] = per[k].detach() if detach else per[k]
        if not edits:
            return None
        # A head's output is not invertible back to z, so the edit is applied to the sum: o + sum(f(o_h) - o_h).
        delta = None
        for k, h in enumerate(heads):
            if h in edits:
                d = edits[h](per[k]) - per[k]
                delta = d if delta is None else delta + d
        return output + delta
    return hook


def attach(model: Any, capture: Iterable[str] = (), interventions: Mapping[str, Intervention] | None = None,
           *, detach: bool = True) -> tuple[dict[str, torch.Tensor], list]:
    """Register hooks; return (cache, handles). Prefer :func:`run_with`, which removes them again."""
    arch = view(model)
    interventions = dict(interventions or {})
    cap = resolve(arch, list(capture)) if capture else []
    edits: dict[HookPoint, Intervention] = {}
    for name, fn in interventions.items():
        if not callable(fn):
            raise InputError(f"intervention for '{name}' must be a function act -> act, got {type(fn).__name__}")
        for hp in resolve(arch, [name]):
            edits[hp] = fn
    cache: dict[str, torch.Tensor] = {}
    handles = []
    cap_set = set(cap)
    points = list(dict.fromkeys([*cap, *edits]))
    heads_cap: dict[int, list[int]] = defaultdict(list)
    heads_edit: dict[int, dict[int, Intervention]] = defaultdict(dict)
    try:
        for hp in points:
            name = hp.name if hp in cap_set else None
            fn = edits.get(hp)
            L = hp.layer
            if hp.kind == "attn_head_out":
                if name is not None:
                    heads_cap[L].append(hp.head)
                if fn is not None:
                    heads_edit[L][hp.head] = fn
            elif hp.kind == "resid_pre":
                handles.append(arch.block(L).register_forward_pre_hook(_input_hook(name, fn, cache, detach)))
            elif hp.kind == "resid_post":
                handles.append(arch.block(L).register_forward_hook(_output_hook(name, fn, cache, detach)))
            elif hp.kind == "attn_out":
                handles.append(arch.attn(L).register_forward_hook(_output_hook(name, fn, cache, detach)))
            elif hp.kind == "mlp_out":
                handles.append(arch.mlp(L).register_forward_hook(_output_hook(name, fn, cache, detach)))
            elif hp.kind == "mlp_post":
                handles.append(arch.mlp_out(L).register_forward_pre_hook(_input_hook(name, fn, cache, detach)))
            else:  # pragma: no cover - hookpoints.KINDS and this dispatch must agree
                raise AssertionError(hp.kind)
        for L in sorted(set(heads_cap) | set(heads_edit)):
            hook = _heads_hook(arch, L, heads_cap.get(L, []), heads_edit.get(L, {}), cache, detach)
            handles.append(arch.attn_o(L).register_forward_hook(hook))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return cache, handles


@contextmanager
def run_with(model: Any, capture: Iterable[str] = (), interventions: Mapping[str, Intervention] | None = None,
             *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: hooks live inside the block; the yielded dict fills with captures by name.

    >>> with run_with(model, capture=["resid_post.*"], interventions={"mlp_out.1": zero_ablate()}) as acts:
    ...     logits = model(input_ids).logits
    >>> acts["resid_post.0"].shape   # [batch, pos, d_model]

    ``capture`` and ``interventions`` keys accept globs (``resid_post.*``, ``attn_head_out.2.*``).
    Each forward inside the block overwrites the entries of the previous one.
    """
    cache, handles = attach(model, capture, interventions, detach=detach)
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()

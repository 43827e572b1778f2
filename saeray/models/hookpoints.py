"""Named hook points: the one vocabulary every stage (spec, harvest, SAE files, sweeps) shares.

Names are ``<kind>.<layer>`` or, for per-head outputs, ``attn_head_out.<layer>.<head>``:

=================  ==========================================================  =============
name               what is captured                                            width
=================  ==========================================================  =============
resid_pre.L        residual stream entering block L                            d_model
resid_post.L       residual stream leaving block L                             d_model
attn_out.L         attention sub-layer output of block L (after W_O, + bias)   d_model
mlp_out.L          MLP sub-layer output of block L                             d_model
mlp_post.L         MLP neuron activations of block L (after the nonlinearity)  d_mlp
attn_head_out.L.H  head H's contribution to attn_out.L (z_H @ W_O[H])          d_model
=================  ==========================================================  =============

A glob form ``resid_post.*`` expands to every layer of a model (see :func:`expand`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_post", "attn_head_out")

_NAME = re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>\d+|\*)(?:\.(?P<head>\d+|\*))?$")

SYNTAX_HELP = (
    "hook points look like 'resid_post.3', 'mlp_post.0', 'attn_head_out.2.5' or 'resid_post.*'; "
    f"kinds: {', '.join(KINDS)}"
)


class HookPointError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    kind: str
    head: int | None = None

    @property
    def name(self) -> str:
        base = f"{self.kind}.{self.layer}"
        return base if self.head is None else f"{base}.{self.head}"

    def __str__(self) -> str:  # noqa: D105
        return self.name

    @property
    def sae_lens_name(self) -> str:
        """TransformerLens-style name that SAELens stores as ``metadata.hook_name``."""
        tl = {
            "resid_pre": "hook_resid_pre",
            "resid_post": "hook_resid_post",
            "attn_out": "hook_attn_out",
            "mlp_out": "hook_mlp_out",
            "mlp_post": "mlp.hook_post",
            "attn_head_out": "attn.hook_result",
        }[self.kind]
        return f"blocks.{self.layer}.{tl}"


def check_syntax(name: str) -> None:
    """Raise HookPointError unless ``name`` is a well-formed hook point or glob (model not needed)."""
    m = _NAME.match(name)
    if not m:
        raise HookPointError(f"'{name}' is not a hook point name; {SYNTAX_HELP}")
    kind, head = m["kind"], m["head"]
    if kind not in KINDS:
        raise HookPointError(f"unknown hook point kind '{kind}' in '{name}'; kinds: {', '.join(KINDS)}")
    if kind == "attn_head_out" and head is None:
        raise HookPointError(f"'{name}': attn_head_out needs a head index, e.g. 'attn_head_out.{m['layer']}.0'")
    if kind != "attn_head_out" and head is not None:
        raise HookPointError(f"'{name}': only attn_head_out takes a head index")


def parse(name: str) -> HookPoint:
    """Parse a concrete (non-glob) hook point name."""
    check_syntax(name)
    if "*" in name:
        raise HookPointError(f"'{name}' is a pattern; expand it against a model first")
    m = _NAME.match(name)
    assert m is not None
    head = int(m["head"]) if m["head"] is not None else None
    return HookPoint(layer=int(m["layer"]), kind=m["kind"], head=head)


def expand(names: list[str], n_layers: int, n_heads: int) -> list[HookPoint]:
    """Expand globs and check layer/head ranges against a model's shape. Order kept, duplicates dropped."""
    out: list[HookPoint] = []
    for name in names:
        check_syntax(name)
        m = _NAME.match(name)
        assert m is not None
        layers = range(n_layers) if m["layer"] == "*" else [int(m["layer"])]
        heads: list[int | None]
        if m["kind"] != "attn_head_out":
            heads = [None]
        else:
            heads = list(range(n_heads)) if m["head"] == "*" else [int(m["head"])]
        for layer in layers:
            if layer >= n_layers:
                raise HookPointError(f"'{name}': layer {layer} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
            for head in heads:
                if head is not None and head >= n_heads:
                    raise HookPointError(f"'{name}': head {head} out of range; the model has {n_heads} heads")
                hp = HookPoint(layer=layer, kind=m["kind"], head=head)
                if hp not in out:
                    out.append(hp)
    return out


def all_names(n_layers: int, n_heads: int) -> list[str]:
    """Every valid concrete hook point of a model of this shape (for error messages)."""
    names = []
    for layer in range(n_layers):
        for kind in KINDS[:-1]:
            names.append(f"{kind}.{layer}")
        names.append(f"attn_head_out.{layer}.0..{n_heads - 1}")
    return names

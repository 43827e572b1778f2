"""Architectures by name, and one ``build`` that checks the sparsity knob each one needs."""
from __future__ import annotations

from ..errors import InputError
from .base import SAE
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .gba import GBASAE
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

ARCHS: dict[str, type[SAE]] = {c.arch: c for c in (ReLUSAE, TopKSAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, GBASAE)}
NEEDS_K = {"topk", "batchtopk"}
NEEDS_L1 = {"relu", "gated", "jumprelu"}   # jumprelu: the coefficient of its L0 penalty


def build(arch: str, d_in: int, width: int, k: float | None = None, l1: float | None = None, **kw) -> SAE:
    if arch not in ARCHS:
        raise InputError(f"unknown SAE architecture '{arch}'; valid: {', '.join(ARCHS)}")
    if d_in < 1 or width < 1:
        raise InputError(f"d_in={d_in} and width={width} must be positive")
    if arch in NEEDS_K:
        if k is None:
            raise InputError(f"architecture '{arch}' needs k (--k), the number of active latents per token")
        if arch == "topk" and (k != int(k) or k < 1):
            raise InputError(f"k={k:g}: TopK keeps a whole number of latents per token; use an integer >= 1 "
                             "(BatchTopK takes a fractional k, its mean per token)")
        if not 0 < k <= width:
            raise InputError(f"k={k:g} must be above 0 and at most the width {width}")
        kw["k"] = int(k) if arch == "topk" else float(k)
    elif k is not None:
        raise InputError(f"architecture '{arch}' takes no k; k is for {', '.join(sorted(NEEDS_K))}")
    if arch in NEEDS_L1:
        if l1 is None:
            raise InputError(f"architecture '{arch}' needs a sparsity coefficient (--l1)")
        if l1 < 0:
            raise InputError(f"l1={l1} must be >= 0")
        kw["l1"] = float(l1)
    elif l1 is not None:
        raise InputError(f"architecture '{arch}' takes no l1 coefficient"
                         + (" (GBA controls sparsity by bias adaptation)" if arch == "gba" else ""))
    check_gba_range(arch, kw.get("htf"), kw.get("ltf"))
    check_k_aux(arch, kw.get("k_aux"))
    try:
        return ARCHS[arch](d_in, width, **kw)
    except TypeError as e:
        raise InputError(f"architecture '{arch}': {e}") from None


def given_opts(**opts) -> dict:
    """The architecture options a user set (``htf``, ``ltf``, ``k_aux``), unset ones left out: a
    ``Variant.opts``. The spec and ``saeray train`` both build theirs here, so an unset option never
    reaches the SAE's name, hparams or spec hash."""
    return {n: v for n, v in opts.items() if v is not None}


def check_gba_range(arch: str, htf: float | None, ltf: float | None) -> None:
    """GBA's target-frequency range (the one GBA setting docs/training.md has a user move): ``htf``/``ltf``
    are GBA's only and, with the defaults filled in, 0 < ltf < htf <= 1."""
    given = given_opts(htf=htf, ltf=ltf)
    if not given:
        return
    if arch != "gba":
        raise InputError(f"architecture '{arch}' takes no {'/'.join(given)}; htf and ltf set GBA's "
                         "target-frequency range")
    import inspect

    defaults = inspect.signature(GBASAE.__init__).parameters
    hi = htf if htf is not None else defaults["htf"].default
    lo = ltf if ltf is not None else defaults["ltf"].default
    if not 0 < lo < hi <= 1:
        raise InputError(f"GBA's target range must satisfy 0 < ltf < htf <= 1; got htf={hi:g}, ltf={lo:g} "
                         "(htf: the densest feature frequency you expect, default 0.1; ltf the rarest, default 1e-4)")


def check_k_aux(arch: str, k_aux: float | None) -> None:
    """``k_aux``, the dead latents AuxK rebuilds the residual with, belongs to the architectures that
    have AuxK (topk, batchtopk) and is a whole number >= 1 (docs/training.md: 2k when k is small)."""
    if k_aux is None:
        return
    if arch not in NEEDS_K:
        raise InputError(f"architecture '{arch}' takes no k_aux; k_aux sizes the AuxK loss of "
                         f"{' and '.join(sorted(NEEDS_K))}")
    if isinstance(k_aux, bool) or k_aux != int(k_aux) or k_aux < 1:
        raise InputError(f"k_aux={k_aux}: the number of dead latents AuxK uses must be a whole number >= 1 "
                         "(default d_in/2; 2k when k is small, docs/training.md)")

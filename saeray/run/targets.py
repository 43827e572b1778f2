"""Targets: the (model, checkpoint) pairs a run audits, expanded from the spec's ``model`` section.

``model`` names one model or a list; each has ``revisions``: explicit checkpoint names, ``all``
(every checkpoint a local checkpoint folder holds: the storyworld zoo's ``step<N>`` folders, a
Pythia-style ``<model>/step<N>/`` layout, plus ``main`` when the folder itself is a checkpoint) or
``latest`` (the newest: ``main`` for a hub model or a folder that is itself a checkpoint, else the
highest ``step<N>``). Every target gets its own folder in the run, ``targets/<model>@<revision>``,
so two checkpoints can never share (or overwrite) activations, SAEs or evaluations.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..modelref import SMOLLM2, ZOO_PREFIX, ModelRef, resolve_model


@dataclass(frozen=True)
class Target:
    model: str            # as written in the spec
    revision: str         # resolved checkpoint name: main, step256, ...
    slug: str             # the model's folder-safe name, unique within the run
    ref: ModelRef

    @property
    def id(self) -> str:
        return f"{self.slug}@{self.revision}"

    @property
    def folder(self) -> str:
        """The target's folder, relative to the run folder."""
        return f"targets/{self.id}"

    def __str__(self) -> str:
        return f"{self.model}@{self.revision}"


def _step_key(rev: str) -> tuple:
    m = re.fullmatch(r"step(\d+)", rev)
    return (0, int(m.group(1)), rev) if m else (1, 0, rev)


def _checkpoint_folder(model_spec) -> Path | None:
    """The local folder whose sub-folders are checkpoints, or None for a hub model."""
    from ..models.load import _is_local

    name = model_spec.name
    if name.startswith(ZOO_PREFIX):
        from ..storyworld.zoo import resolve as zoo_resolve

        return Path(zoo_resolve(name, None))
    if name == SMOLLM2:   # a local folder that is itself the only checkpoint, main
        from ..models.smollm2 import materialize

        return materialize()
    if _is_local(name):
        folder = Path(name.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise InputError(f"model.name: '{name}' does not exist; give a local folder with config.json and "
                             "model.safetensors, a zoo model (storyworld-4l) or a Hugging Face model name")
        return folder
    return None


def local_revisions(folder: Path) -> list[str]:
    """Checkpoints of a local folder, oldest first: step<N> sub-folders by N, then main."""
    subs = [p.name for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    revs = sorted(subs, key=_step_key)
    if (folder / "config.json").is_file() and "main" not in revs:
        revs.append("main")
    return revs


def expand_revisions(model_spec, where: str) -> list[str]:
    folder = _checkpoint_folder(model_spec)
    out: list[str] = []
    for rev in model_spec.revisions:
        if rev == "all":
            if folder is None:
                raise InputError(f"{where}.revisions: 'all' needs a local checkpoint folder; {model_spec.name!r} is a "
                                 "hub model, so name its revisions (e.g. [step1000, main])")
            found = local_revisions(folder)
            if not found:
                raise InputError(f"{where}.revisions: 'all' found no checkpoints in {folder} (sub-folders with "
                                 "config.json)")
            out += found
        elif rev == "latest":
            if folder is None or (folder / "config.json").is_file():
                out.append("main")
            else:
                found = local_revisions(folder)
                if not found:
                    raise InputError(f"{where}.revisions: 'latest' found no checkpoints in {folder}")
                out.append(found[-1])
        else:
            out.append(rev)
    return list(dict.fromkeys(out))   # `[all, main]` names main once


def _slug(name: str) -> str:
    if name.startswith(ZOO_PREFIX) or name == SMOLLM2:
        base = name
    elif name.startswith(("/", ".", "~", "file://")) or Path(name).exists():
        base = Path(name.removeprefix("file://")).expanduser().resolve().name or "model"
    else:
        base = name.replace("/", "--")     # hub id org/name, as the HF cache spells it
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


def expand_targets(spec, revision: str | None = None) -> list[Target]:
    """Every target of the spec in order (models as listed, revisions oldest first as listed).

    ``revision`` overrides every model's revisions (``saeray harvest --revision``)."""
    models = spec.models
    slugs = [_slug(m.name) for m in models]
    clash = {s for s in slugs if slugs.count(s) > 1}   # two local folders both called "model", say
    slugs = [f"{s}-{hashlib.sha256(m.name.encode()).hexdigest()[:6]}" if s in clash else s
             for s, m in zip(slugs, models)]
    out = []
    for i, (m, slug) in enumerate(zip(models, slugs)):
        where = f"model[{i}]" if len(models) > 1 else "model"
        revs = [revision] if revision else expand_revisions(m, where)
        for rev in revs:
            try:
                ref = resolve_model(m, rev)
            except InputError as e:
                raise InputError(f"{where}.revisions: {e}") from None
            out.append(Target(m.name, rev, slug, ref))
    return out

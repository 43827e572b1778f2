"""Targets: model x revision expansion (`all`, `latest`, explicit names), one folder per target."""
from __future__ import annotations

import json

import pytest

from saeray.errors import InputError
from saeray.run.targets import expand_targets
from saeray.spec import parse_spec


def _spec(model) -> object:
    return parse_spec(json.dumps({"name": "t", "model": model, "hookpoints": ["resid_post.0"]}))


@pytest.fixture(scope="module")
def ckpt_folder(tmp_path_factory, tiny_model):
    """A Pythia-style local layout: <model>/step<N>/ checkpoints (and the folder itself is main)."""
    import shutil

    root = tmp_path_factory.mktemp("ck") / "pythia-ish"
    shutil.copytree(tiny_model, root)
    for step in (1000, 20, 300):
        shutil.copytree(tiny_model, root / f"step{step}")
    return root


def test_all_latest_and_names(ckpt_folder):
    ts = expand_targets(_spec({"name": str(ckpt_folder), "revisions": "all"}))
    assert [t.revision for t in ts] == ["step20", "step300", "step1000", "main"]       # by step, then main
    assert [t.id for t in ts][0] == "pythia-ish@step20" and ts[0].folder == "targets/pythia-ish@step20"
    assert ts[0].ref.path == str(ckpt_folder / "step20") and ts[-1].ref.path == str(ckpt_folder)
    assert [t.revision for t in expand_targets(_spec({"name": str(ckpt_folder), "revisions": ["latest"]}))] == ["main"]
    assert [t.revision for t in expand_targets(_spec({"name": str(ckpt_folder), "revisions": ["all", "main"]}))] == \
        ["step20", "step300", "step1000", "main"]                                         # main named once
    # a folder that only holds checkpoints: latest is the highest step
    only = ckpt_folder.parent / "only-steps"
    only.mkdir()
    for step in (5, 40):
        (only / f"step{step}").symlink_to(ckpt_folder / "step20")
    assert [t.revision for t in expand_targets(_spec({"name": str(only), "revisions": "latest"}))] == ["step40"]
    # --revision overrides the spec's revisions
    assert [t.id for t in expand_targets(_spec({"name": str(ckpt_folder)}), revision="step300")] == ["pythia-ish@step300"]


def test_bad_revisions_name_the_field(ckpt_folder):
    with pytest.raises(InputError, match=r"model\.revisions: model '.*' has no revision 'step7'.*revisions found: "
                                         r"step1000, step20, step300"):
        expand_targets(_spec({"name": str(ckpt_folder), "revisions": ["step7"]}))
    with pytest.raises(InputError, match=r"model\[1\]\.revisions: 'all' needs a local checkpoint folder"):
        expand_targets(_spec([{"name": str(ckpt_folder)}, {"name": "EleutherAI/pythia-70m", "revisions": "all"}]))


def test_several_models_get_distinct_folders(tmp_path, tiny_model):
    import shutil

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, b)
    ts = expand_targets(_spec([{"name": str(a)}, {"name": str(b)}, {"name": "EleutherAI/pythia-70m",
                                                                     "revisions": ["step1000"]}]))
    ids = [t.id for t in ts]
    assert len(set(ids)) == 3 and ids[0].startswith("model-") and ids[1].startswith("model-")
    assert ids[2] == "EleutherAI--pythia-70m@step1000"       # hub id as the HF cache spells it


def test_zoo_revisions(tmp_path, monkeypatch):
    """The test zoo's checkpoints expand like any local checkpoint folder (built in seconds)."""
    monkeypatch.setenv("SAERAY_CACHE", str(tmp_path / "cache"))
    ts = expand_targets(_spec({"name": "storyworld-tiny-1l", "revisions": "all"}))
    assert [t.revision for t in ts] == [f"step{s}" for s in (0, 1, 2, 4, 8, 16, 32, 64)] + ["main"]
    assert [t.revision for t in expand_targets(_spec({"name": "storyworld-tiny-1l", "revisions": "latest"}))] == ["main"]

"""The storyworld zoo, built for real at its tiny size (``ZooConfig.tiny()``) in temporary caches."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see build_zoo: effective only if torch is not loaded yet

from saeray.errors import InputError, SaerayError
from saeray.storyworld.zoo import (ZooConfig, build_zoo, is_built, list_zoo, resolve, summary_rows, zoo_path)

TINY = ZooConfig.tiny()
SAERAY = str(Path(sys.executable).with_name("saeray"))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo-cache")
    t0 = time.perf_counter()
    path = build_zoo(TINY, progress=False, cache_dir=cache)
    return {"cache": cache, "path": path, "seconds": time.perf_counter() - t0}


def test_default_config_shape():
    cfg = ZooConfig()
    assert len(cfg.models) >= 3
    widths = [(m.n_layer, m.d_model) for m in cfg.models]
    assert widths == sorted(widths) and len(set(widths)) == len(widths)
    assert any(m.name == "storyworld-4l" and m.n_layer == 4 for m in cfg.models)  # the default audit's model
    steps = cfg.checkpoint_steps()
    assert len(steps) >= 8 and steps[0] == 0 and steps[-1] == cfg.steps
    assert all(b == 2 * a for a, b in zip(steps[1:-2], steps[2:-1]))  # log-spaced
    assert ZooConfig().hash() == cfg.hash() != TINY.hash()
    assert ZooConfig(threads=1).hash() == cfg.hash()  # threads change speed, not the recipe


def test_layout_and_index(zoo):
    path = zoo["path"]
    assert path == zoo_path(TINY, zoo["cache"]) and path.name == TINY.hash()
    index = json.loads((path / "zoo.json").read_text())
    steps = TINY.checkpoint_steps()
    assert len(steps) >= 8 and index["checkpoint_steps"] == steps
    assert index["hash"] == TINY.hash() and index["language"] and index["build_seconds"] > 0
    assert index["eval"]["fact_positions"] > 0 and index["eval"]["copy_positions"] > 0
    assert 0 < index["eval"]["optimal_loss"] < 3
    assert set(index["models"]) == {m.name for m in TINY.models}
    for spec in TINY.models:
        m = index["models"][spec.name]
        assert m["hf_config"]["model_type"] == "gpt_neox" and m["hf_config"]["num_hidden_layers"] == spec.n_layer
        assert len(m["train_loss"]) == TINY.steps
        assert [c["revision"] for c in m["checkpoints"]] == [f"step{s}" for s in steps]
        for c in m["checkpoints"]:
            for k in ("heldout_loss", "excess_loss", "fact_acc", "copy_acc", "train_tokens"):
                assert k in c
            assert (path / spec.name / c["revision"] / "model.safetensors").is_file()
            assert (path / spec.name / c["revision"] / "tokenizer.json").is_file()
        # the model folder itself is the final checkpoint ("main"), byte for byte
        final = path / spec.name / f"step{TINY.steps}"
        assert (path / spec.name / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
        # training helped, and the excess over the optimal loss is what it says
        first, last = m["checkpoints"][0], m["checkpoints"][-1]
        assert last["heldout_loss"] < first["heldout_loss"] - 1.0
        assert last["excess_loss"] == pytest.approx(last["heldout_loss"] - index["eval"]["optimal_loss"])
    rows = summary_rows(list_zoo(TINY, zoo["cache"]))
    assert len(rows) == len(TINY.models) * len(steps)


def test_checkpoints_load_with_transformers(zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saeray.storyworld.generator import generate_doc

    root = zoo["path"] / "storyworld-tiny-2l"
    doc = generate_doc(0, split="heldout")
    a = AutoModelForCausalLM.from_pretrained(str(root / "step8"))
    b = AutoModelForCausalLM.from_pretrained(str(root), subfolder="step8")
    main = AutoModelForCausalLM.from_pretrained(str(root))
    tok = AutoTokenizer.from_pretrained(str(root / "step8"))
    ids = torch.tensor([tok(doc.text).input_ids])
    assert ids[0].tolist() == doc.token_ids
    with torch.no_grad():
        la, lb, lm = a(ids).logits, b(ids).logits, main(ids).logits
    assert a.config.model_type == "gpt_neox" and a.config.num_hidden_layers == 2
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lm)  # step 8 is not the final model


def test_resolve(zoo):
    kw = dict(config=TINY, cache_dir=zoo["cache"])
    root = zoo["path"] / "storyworld-tiny-1l"
    assert resolve("storyworld-tiny-1l", **kw) == root
    assert resolve("storyworld-tiny-1l", "main", **kw) == root
    assert resolve("storyworld-tiny-1l", "step16", **kw) == root / "step16"
    with pytest.raises(InputError, match="storyworld-tiny-2l"):
        resolve("storyworld-nope", **kw)
    with pytest.raises(InputError, match="step16"):
        resolve("storyworld-tiny-1l", "step3", **kw)


def test_cache_is_reused(zoo):
    before = _digest(zoo["path"])
    mtime = (zoo["path"] / "zoo.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_zoo(TINY, progress=False, cache_dir=zoo["cache"])
    assert again == zoo["path"]
    assert time.perf_counter() - t0 < 0.5 < zoo["seconds"]
    assert (again / "zoo.json").stat().st_mtime_ns == mtime and _digest(again) == before
    # no leftovers from the build
    assert sorted(p.name for p in zoo["path"].parent.iterdir() if p.name.startswith(".")) == []


def test_build_is_deterministic(zoo, tmp_path):
    other = build_zoo(TINY, progress=False, cache_dir=tmp_path)
    assert other != zoo["path"] and other.name == zoo["path"].name
    a, b = _digest(zoo["path"]), _digest(other)
    assert len(a) == len(TINY.models) * (len(TINY.checkpoint_steps()) + 1)
    assert a == b
    ia, ib = (json.loads((p / "zoo.json").read_text()) for p in (zoo["path"], other))
    for name in ia["models"]:
        assert ia["models"][name]["checkpoints"] == ib["models"][name]["checkpoints"]


def test_not_built_says_how(tmp_path):
    assert not is_built(TINY, tmp_path)
    with pytest.raises(SaerayError, match="saeray zoo build"):
        list_zoo(TINY, tmp_path)


# ---- CLI ----------------------------------------------------------------------------------------------

def _run(*args: str, env_cache: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if env_cache:
        env["SAERAY_CACHE"] = env_cache
    return subprocess.run([SAERAY, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_build_and_list(zoo):
    cache = str(zoo["cache"])
    r = _run("zoo", "build", "--tiny", "--cache", cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(zoo["path"])
    r = _run("zoo", "build", "--tiny", "--json", env_cache=cache)   # $SAERAY_CACHE is the default cache
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["path"] == str(zoo["path"]) and set(out["models"]) == {m.name for m in TINY.models}
    r = _run("zoo", "list", "--tiny", "--cache", cache, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["rows"]) == len(TINY.models) * len(TINY.checkpoint_steps())
    assert {row["revision"] for row in out["rows"]} == {f"step{s}" for s in TINY.checkpoint_steps()}
    r = _run("zoo", "list", "--tiny", "--cache", cache)
    assert r.returncode == 0 and "storyworld-tiny-2l" in r.stdout and "step64" in r.stdout


def test_cli_list_unbuilt(tmp_path):
    r = _run("zoo", "list", "--cache", str(tmp_path))
    assert r.returncode == 1
    assert "saeray zoo build" in r.stderr and "--cache" in r.stderr

"""load_model: local folders, Pythia-style revision folders, dtype, safetensors-only, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from saeray.errors import InputError
from saeray.models.load import load_model, resolve
from saeray.models.random_init import random_model, save_random_model

torch.set_num_threads(1)
SHAPE = dict(n_layers=2, d_model=32, n_heads=2, vocab_size=40)


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "the": 2, "cat": 3, "sat": 4}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """<root>/tiny/step0, step50 (different weights) with the tokenizer at the model root, Pythia-style."""
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    for step, seed in (("step0", 0), ("step50", 1)):
        save_random_model(root / step, "gpt_neox", seed=seed, **SHAPE)
    _word_tokenizer().save_pretrained(root)
    return root


def test_local_folder_is_frozen_eval_float32(tmp_path):
    path = save_random_model(tmp_path / "m", "llama", seed=4, **SHAPE)
    model, tok = load_model(path)
    assert tok is None  # no tokenizer files in this checkpoint
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = random_model("llama", seed=4, **SHAPE)
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_dtype(tmp_path):
    path = save_random_model(tmp_path / "m", "gpt2", **SHAPE)
    model, _ = load_model(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(InputError, match="float32, float16, bfloat16"):
        load_model(path, dtype="float8")


def test_revision_folders_resolve(zoo):
    m0, tok = load_model(zoo, revision="step0")
    m50, _ = load_model(str(zoo), revision="step50")
    ids = torch.tensor([[2, 3, 4]])
    torch.testing.assert_close(m0(ids).logits, random_model("gpt_neox", seed=0, **SHAPE)(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(m50(ids).logits, random_model("gpt_neox", seed=1, **SHAPE)(ids).logits, rtol=0, atol=0)
    assert tok is not None and tok("the cat sat")["input_ids"] == [2, 3, 4]  # found at the model root
    assert resolve(zoo / "step50") == (str(zoo / "step50"), None)
    assert resolve("EleutherAI/pythia-70m", "step1000") == ("EleutherAI/pythia-70m", "step1000")


def test_missing_revision_lists_the_available_ones(zoo):
    with pytest.raises(InputError) as e:
        load_model(zoo, revision="step7")
    assert "step7" in str(e.value) and "step0, step50" in str(e.value)
    with pytest.raises(InputError, match="pass a revision, one of: step0, step50"):
        load_model(zoo)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot find model 'saeray-test/definitely-not-cached'"):
        load_model("saeray-test/definitely-not-cached")


def test_unsupported_architecture(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16, max_position_embeddings=32)).save_pretrained(tmp_path / "opt")
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "opt")
    assert "unsupported model architecture 'opt'" in str(e.value)
    assert all(f in str(e.value) for f in ("gpt_neox", "gpt2", "llama", "qwen2", "mistral"))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = save_random_model(tmp_path / "m", "gpt2", **SHAPE)
    sd = random_model("gpt2", **SHAPE).state_dict()
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(InputError, match="safetensors"):
        load_model(path)


def test_remote_code_needs_consent(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "saeray_custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (folder / "configuration_custom.py").write_text("raise RuntimeError('remote code must not run')\n")
    with pytest.raises(InputError, match="trust_remote_code"):
        load_model(folder)

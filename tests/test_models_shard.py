"""Sharding: stages composed in order reproduce the whole model, in one process (split) and when each
stage is built from the checkpoint alone (Stage.from_pretrained, as a Ray actor does)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeray.errors import InputError
from saeray.models import hooks
from saeray.models.arch import view
from saeray.models.load import load_model
from saeray.models.random_init import save_random_model
from saeray.models.shard import Stage, StageOutput, check_boundaries, even_boundaries, route, split

torch.set_num_threads(1)

N_LAYERS, D, HEADS, D_MLP, VOCAB = 3, 64, 4, 96, 61
FAMILIES = {
    "neox_parallel": ("gpt_neox", {}),
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt2": ("gpt2", {}),  # tied embeddings
    "llama_gqa_bias": ("llama", {"num_key_value_heads": 2, "attention_bias": True}),
    # Sliding-window layers from layer 1 on, window shorter than the sequence: the per-layer mask matters.
    "qwen2_sliding": ("qwen2", {"num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 4,
                                "max_window_layers": 1}),
    "mistral_sliding": ("mistral", {"num_key_value_heads": 2, "sliding_window": 5}),
}
T = 12


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    family, overrides = FAMILIES[request.param]
    path = save_random_model(tmp_path_factory.mktemp(request.param), family, seed=2, n_layers=N_LAYERS, d_model=D,
                             n_heads=HEADS, d_mlp=D_MLP, vocab_size=VOCAB, **overrides)
    model, _ = load_model(path)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    return path, model, ids


def _compose(stages, ids, **kw):
    x = ids
    for st in stages:
        x = st(x, **kw).output
    return x


@pytest.mark.parametrize("boundaries", [[1], [2], [1, 2]])
def test_split_stages_reproduce_logits(tiny, boundaries):
    _, model, ids = tiny
    ref = model(ids).logits
    stages = split(model, boundaries)
    assert len(stages) == len(boundaries) + 1
    torch.testing.assert_close(_compose(stages, ids), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("start_layer", [0, 1, 2])
def test_stage_started_at_a_block_from_its_input_reproduces_logits(tiny, start_layer):
    """What evaluation's resumed passes rely on: from resid_pre.L of a clean pass, blocks L.. give
    the model's logits (on the first stage too, where the embeddings must not be added twice)."""
    _, model, ids = tiny
    (whole,) = split(model, [])
    kept = whole(ids, capture=[f"resid_pre.{start_layer}"]).acts[f"resid_pre.{start_layer}"]
    torch.testing.assert_close(whole(kept.clone(), start_layer=start_layer).output, model(ids).logits,
                               rtol=0, atol=1e-5)


def test_split_stages_with_padding_mask(tiny):
    _, model, ids = tiny
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    ref = model(ids, attention_mask=mask).logits
    out = _compose(split(model, [1, 2]), ids, attention_mask=mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-5)
    # the mask is honoured: without it the padded row's real positions differ
    unmasked = model(ids).logits
    assert (unmasked[1, 3:] - ref[1, 3:]).abs().max() > 1e-4


@pytest.mark.parametrize("tiny", ["qwen2_sliding", "mistral_sliding"], indirect=True)
def test_sliding_window_is_in_effect(tiny):
    _, model, ids = tiny
    # Same weights with full attention everywhere give different logits, so the stages matching the
    # sliding model (test above) shows they build the per-layer sliding masks.
    full = copy.deepcopy(model)
    if getattr(full.config, "layer_types", None):  # Qwen2: per-layer types
        full.config.layer_types = ["full_attention"] * N_LAYERS
    else:  # Mistral: one model-wide window
        full.config.sliding_window = None
    assert (full(ids).logits - model(ids).logits).abs().max() > 1e-4


def test_stage_captures_and_interventions_match_the_whole_model(tiny):
    _, model, ids = tiny
    points = ["resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*", "mlp_post.*", "attn_head_out.*.*"]
    edits = {"mlp_out.0": hooks.zero_ablate(), "resid_pre.2": hooks.add(torch.ones(D), 0.5),
             "attn_head_out.1.1": hooks.mean_ablate(torch.full((D,), 0.1))}
    with hooks.run_with(model, points, edits) as ref_acts:
        ref = model(ids).logits
    stages = split(model, [1, 2])
    x, acts = ids, {}
    for st in stages:
        res = st(x, capture=points, interventions={k: f for k, f in edits.items()
                                                   if int(k.split(".")[1]) in range(*st.layer_range)})
        assert isinstance(res, StageOutput)
        assert all(int(k.split(".")[1]) in range(*st.layer_range) for k in res.acts)
        acts.update(res.acts)
        x = res.output
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    assert set(acts) == set(ref_acts) and len(acts) == N_LAYERS * (5 + HEADS)
    for k in acts:
        torch.testing.assert_close(acts[k], ref_acts[k], rtol=0, atol=1e-5)


def test_from_pretrained_stages_reproduce_logits_and_hold_only_their_layers(tiny):
    path, model, ids = tiny
    ref = model(ids).logits
    a = view(model)
    stages = [Stage.from_pretrained(path, r) for r in [(0, 1), (1, 2), (2, 3)]]
    torch.testing.assert_close(_compose(stages, ids), ref, rtol=0, atol=1e-5)

    first, middle, last = stages
    assert first.is_first and not first.is_last and last.is_last and not middle.is_first
    block_params = {n: p for n, p in a.blocks[1].named_parameters()}
    assert {n for n, _ in middle.named_parameters()} == {f"blocks.0.{n}" for n in block_params}
    for n, p in block_params.items():
        assert torch.equal(dict(middle.named_parameters())[f"blocks.0.{n}"], p)
    n_block = sum(p.numel() for p in block_params.values())
    assert sum(p.numel() for p in middle.parameters()) == n_block
    assert middle.embed is None and middle.unembed is None and middle.final_norm is None
    assert first.embed is not None and first.unembed is None and len(first.blocks) == 1
    # the last stage has its unembedding even when it is tied to the embedding in the file (GPT-2)
    assert torch.equal(last.unembed.weight, model.get_output_embeddings().weight)
    assert not any(p.requires_grad for st in stages for p in st.parameters())


def test_from_pretrained_single_stage_and_captures(tiny):
    path, model, ids = tiny
    whole = Stage.from_pretrained(path, (0, N_LAYERS))
    with hooks.run_with(model, ["mlp_post.2", "attn_head_out.0.3"]) as ref_acts:
        ref = model(ids).logits
    res = whole(ids, capture=["mlp_post.2", "attn_head_out.0.3"])
    torch.testing.assert_close(res.output, ref, rtol=0, atol=1e-5)
    for k in ref_acts:
        torch.testing.assert_close(res.acts[k], ref_acts[k], rtol=0, atol=1e-5)
    hidden = whole(ids, logits=False).output
    assert hidden.shape == (2, T, D)


def test_stage_rejects_hook_points_of_other_stages(tiny):
    _, model, ids = tiny
    _, second = split(model, [2])
    hidden = torch.zeros(2, T, D)
    with pytest.raises(InputError, match="holds layers 2..2"):
        second(hidden, capture=["resid_post.0"])
    assert set(second(hidden, capture=["resid_post.*"]).acts) == {"resid_post.2"}
    with pytest.raises(InputError, match="hidden states"):
        second(ids)
    with pytest.raises(InputError, match="token ids"):
        split(model, [2])[0](hidden)


def test_stage_pickles(tiny):
    _, model, ids = tiny
    first, _ = split(model, [2])
    clone = pickle.loads(pickle.dumps(first))
    assert torch.equal(clone(ids).output, first(ids).output)


def test_revision_folder_dtype_and_sharded_checkpoint(tmp_path):
    root = tmp_path / "pythia-like"
    for step, seed in (("step0", 0), ("step100", 5)):
        save_random_model(root / step, "gpt_neox", seed=seed, n_layers=4, d_model=32, n_heads=2, vocab_size=40)
    model, _ = load_model(root, revision="step100")
    ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    stages = [Stage.from_pretrained(root, r, revision="step100") for r in [(0, 2), (2, 4)]]
    torch.testing.assert_close(_compose(stages, ids), ref, rtol=0, atol=1e-5)
    other = [Stage.from_pretrained(root, r, revision="step0") for r in [(0, 2), (2, 4)]]
    assert (_compose(other, ids) - ref).abs().max() > 1e-4

    half = Stage.from_pretrained(root, (2, 4), revision="step100", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.rotary.inv_freq.dtype == torch.float32  # rotary frequencies stay float32, as in transformers

    # a sharded checkpoint (model.safetensors.index.json + several files)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    stages = [Stage.from_pretrained(sharded, r) for r in [(0, 1), (1, 3), (3, 4)]]
    torch.testing.assert_close(_compose(stages, ids), ref, rtol=0, atol=1e-5)


def test_gpt2_checkpoint_without_base_prefix(tmp_path):
    """Original GPT-2 files name tensors 'h.0.attn...' / 'wte.weight', without 'transformer.'."""
    path = save_random_model(tmp_path / "g", "gpt2", seed=3, n_layers=2, d_model=32, n_heads=2, vocab_size=40)
    model, _ = load_model(path)
    sd = load_file(path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    stages = [Stage.from_pretrained(path, r) for r in [(0, 1), (1, 2)]]
    torch.testing.assert_close(_compose(stages, ids), model(ids).logits, rtol=0, atol=1e-5)


def test_boundaries_and_routing(tmp_path):
    assert check_boundaries([2, 3], 4) == [(0, 2), (2, 3), (3, 4)]
    assert check_boundaries([], 4) == [(0, 4)]
    for bad in ([0], [4], [3, 2], [2, 2]):
        with pytest.raises(InputError, match="strictly increasing"):
            check_boundaries(bad, 4)
    assert even_boundaries(12, 4) == [3, 6, 9] and even_boundaries(5, 2) == [2]
    ranges = check_boundaries([1, 3], 4)
    assert route(["resid_post.*", "attn_head_out.3.1"], ranges, 4, 2) == [
        ["resid_post.0"], ["resid_post.1", "resid_post.2"], ["resid_post.3", "attn_head_out.3.1"]]
    with pytest.raises(InputError):
        Stage.from_pretrained("/nonexistent/model", (0, 1))
    from saeray.models.random_init import random_model

    m = random_model("gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=40)
    a = view(m)
    with pytest.raises(InputError, match="layer range"):
        Stage(m.config, a.family, (1, 3), [a.blocks[1]])
    with pytest.raises(InputError, match="layer range"):
        Stage.from_pretrained(save_random_model(tmp_path / "m", "gpt2", n_layers=2, d_model=32, n_heads=2,
                                                vocab_size=40), (1, 3))

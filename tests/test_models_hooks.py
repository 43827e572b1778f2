"""Hook points and the architecture view, checked against manual forward computations for every family.

Tiny random-init models (3 layers, d_model 64, 4 heads) are saved to disk and loaded back through
load_model, as real checkpoints would be.
"""
from __future__ import annotations

import copy

import pytest
import torch

from saeray.errors import InputError
from saeray.models import hooks
from saeray.models.arch import family_of, view
from saeray.models.load import load_model
from saeray.models.random_init import random_config, save_random_model

torch.set_num_threads(1)

N_LAYERS, D, HEADS, D_MLP, VOCAB = 3, 64, 4, 96, 61
FAMILIES = {
    "neox_parallel": ("gpt_neox", {}),  # Pythia: use_parallel_residual=True
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt2": ("gpt2", {}),
    "llama_gqa_bias": ("llama", {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    family, overrides = FAMILIES[request.param]
    path = save_random_model(tmp_path_factory.mktemp(request.param), family, seed=1, n_layers=N_LAYERS, d_model=D,
                             n_heads=HEADS, d_mlp=D_MLP, vocab_size=VOCAB, **overrides)
    model, _ = load_model(path)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, ids


def _act_fn(mlp):
    return getattr(mlp, "act", None) or mlp.act_fn


def _bias(b):
    return 0 if b is None else b


def _logits(model, ids):
    return model(ids).logits


def test_residual_points_equal_hidden_states(tiny):
    model, ids = tiny
    a = view(model)
    with hooks.run_with(model, ["resid_pre.*", "resid_post.*"]) as acts:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    for L in range(N_LAYERS):
        torch.testing.assert_close(acts[f"resid_pre.{L}"], hs[L], rtol=0, atol=0)
        if L < N_LAYERS - 1:
            torch.testing.assert_close(acts[f"resid_post.{L}"], hs[L + 1], rtol=0, atol=0)
    last = acts[f"resid_post.{N_LAYERS - 1}"]
    torch.testing.assert_close(a.final_norm(last), hs[N_LAYERS], rtol=0, atol=0)  # transformers 5: last entry is normed
    torch.testing.assert_close(a.final_norm(last) @ a.W_U, out.logits, rtol=1e-5, atol=1e-5)


def test_sublayer_points_recomputed_from_modules_and_weights(tiny):
    model, ids = tiny
    a = view(model)
    with hooks.run_with(model, ["resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*", "mlp_post.*"]) as acts:
        model(ids)
    for L in range(N_LAYERS):
        pre, attn, mlp = acts[f"resid_pre.{L}"], acts[f"attn_out.{L}"], acts[f"mlp_out.{L}"]
        post, neurons = acts[f"resid_post.{L}"], acts[f"mlp_post.{L}"]
        assert neurons.shape == (2, 10, D_MLP) and mlp.shape == (2, 10, D)
        torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
        # The MLP reads resid_pre directly under GPT-NeoX's parallel residual, resid_pre + attn_out otherwise.
        x = a.ln_mlp(L)(pre if a.parallel_residual else pre + attn)
        torch.testing.assert_close(a.mlp(L)(x), mlp, rtol=1e-5, atol=1e-5)
        lin = x @ a.W_in(L) + _bias(a.b_in(L))
        act = _act_fn(a.mlp(L))
        if a.W_gate(L) is None:
            expect = act(lin)
        else:  # gated (SwiGLU): act(x W_gate) * (x W_in)
            expect = act(x @ a.W_gate(L) + _bias(a.mlp(L).gate_proj.bias)) * lin
        torch.testing.assert_close(neurons, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(neurons @ a.W_out(L) + _bias(a.b_out(L)), mlp,
                                   rtol=1e-5, atol=1e-5)


def test_heads_sum_to_attn_out_and_match_a_single_head_model(tiny):
    model, ids = tiny
    a = view(model)
    L = 1
    with hooks.run_with(model, [f"attn_out.{L}", f"attn_head_out.{L}.*"]) as acts:
        model(ids)
    total = sum(acts[f"attn_head_out.{L}.{h}"] for h in range(HEADS))
    bias = a.b_O(L) if a.b_O(L) is not None else 0
    torch.testing.assert_close(total + bias, acts[f"attn_out.{L}"], rtol=1e-5, atol=1e-5)
    # Independent check of the per-head slice of W_O: a copy whose W_O keeps only head 2 (and no bias)
    # must output exactly head 2's contribution as its attn_out.
    solo = copy.deepcopy(model)
    s = view(solo)
    W = s.W_O(L)  # a view of the stored weight, whatever its orientation
    keep = torch.zeros(HEADS, dtype=torch.bool)
    keep[2] = True
    W[~keep] = 0
    if s.b_O(L) is not None:
        s.b_O(L).zero_()
    with hooks.run_with(solo, [f"attn_out.{L}"]) as solo_acts:
        solo(ids)
    torch.testing.assert_close(solo_acts[f"attn_out.{L}"], acts[f"attn_head_out.{L}.2"], rtol=1e-5, atol=1e-5)


def test_identity_replacement_leaves_logits_unchanged(tiny):
    model, ids = tiny
    ref = _logits(model, ids)
    every = ["resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*", "mlp_post.*", "attn_head_out.*.*"]
    with hooks.run_with(model, interventions={n: (lambda x: x) for n in every}):
        out = _logits(model, ids)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("point", ["resid_pre.1", "resid_post.0", "attn_out.1", "mlp_out.2", "mlp_post.1",
                                   "attn_head_out.1.3"])
def test_zero_ablation_changes_logits(tiny, point):
    model, ids = tiny
    ref = _logits(model, ids)
    with hooks.run_with(model, interventions={point: hooks.zero_ablate()}):
        out = _logits(model, ids)
    assert (out - ref).abs().max() > 1e-4
    # and the hooks are gone afterwards
    assert torch.equal(_logits(model, ids), ref)


def test_ablations_and_steering_give_the_computed_logits(tiny):
    model, ids = tiny
    a = view(model)
    last = f"resid_post.{N_LAYERS - 1}"
    g = torch.Generator().manual_seed(3)
    m, v = torch.randn(D, generator=g), torch.randn(D, generator=g)
    with hooks.run_with(model, [last]) as acts:
        ref = _logits(model, ids)
    h = acts[last]

    def head(x):
        return a.final_norm(x) @ a.W_U

    with hooks.run_with(model, interventions={last: hooks.mean_ablate(m)}):
        torch.testing.assert_close(_logits(model, ids), head(m).expand_as(ref), rtol=1e-5, atol=1e-5)
    with hooks.run_with(model, interventions={last: hooks.add(v, scale=2.5)}):
        torch.testing.assert_close(_logits(model, ids), head(h + 2.5 * v), rtol=1e-5, atol=1e-5)
    with hooks.run_with(model, interventions={last: hooks.zero_ablate()}):
        torch.testing.assert_close(_logits(model, ids), head(torch.zeros(D)).expand_as(ref), rtol=1e-5, atol=1e-5)
    # positions: only the masked positions change
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, -1] = True
    with hooks.run_with(model, interventions={last: hooks.add(v, scale=4.0, positions=mask)}):
        out = _logits(model, ids)
    assert torch.equal(out[:, :-1], ref[:, :-1])
    torch.testing.assert_close(out[:, -1], head(h[:, -1] + 4.0 * v), rtol=1e-5, atol=1e-5)


def test_zero_ablating_a_head_equals_removing_its_output_weights(tiny):
    model, ids = tiny
    with hooks.run_with(model, interventions={"attn_head_out.1.2": hooks.zero_ablate()}):
        out = _logits(model, ids)
    cut = copy.deepcopy(model)
    view(cut).W_O(1)[2] = 0
    torch.testing.assert_close(out, _logits(cut, ids), rtol=1e-5, atol=1e-5)


def test_capture_sees_value_before_its_own_intervention(tiny):
    model, ids = tiny
    with hooks.run_with(model, ["resid_post.0", "resid_pre.1"], {"resid_post.0": hooks.zero_ablate()}) as acts:
        model(ids)
    assert acts["resid_post.0"].abs().sum() > 0
    assert acts["resid_pre.1"].abs().sum() == 0


def test_gradients_flow_through_interventions(tiny):
    model, ids = tiny
    v = torch.zeros(D, requires_grad=True)
    with hooks.run_with(model, interventions={"resid_post.0": hooks.add(v)}):
        model(ids).logits[:, -1, 0].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_inference_mode_capture(tiny):
    model, ids = tiny
    with torch.inference_mode(), hooks.run_with(model, ["mlp_post.0", "attn_head_out.0.1"]) as acts:
        model(ids)
    assert acts["mlp_post.0"].shape == (2, 10, D_MLP)
    assert acts["attn_head_out.0.1"].shape == (2, 10, D) and acts["attn_head_out.0.1"].is_contiguous()


def test_architecture_view_shapes(tiny):
    model, _ = tiny
    a = view(model)
    assert (a.n_layers, a.n_heads, a.d_model, a.d_head, a.d_mlp, a.d_vocab) == (N_LAYERS, HEADS, D, D // HEADS, D_MLP, VOCAB)
    assert a.W_E.shape == (VOCAB, D) and a.W_U.shape == (D, VOCAB)
    for L in range(N_LAYERS):
        assert a.W_in(L).shape == (D, D_MLP) and a.W_out(L).shape == (D_MLP, D)
        assert a.W_O(L).shape == (HEADS, D // HEADS, D)
        assert (a.W_gate(L) is not None) == (a.family.name == "llama")
    assert hooks.width(model, "mlp_post.0") == D_MLP and hooks.width(model, "attn_head_out.0.0") == D


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_unknown_hook_point_lists_valid_ones(tiny):
    model, _ = tiny
    before = _n_hooks(model)
    for bad in ["resid_post.3", "attn_head_out.0.4", "mlp_pre.0", "resid_post"]:
        with pytest.raises(InputError) as e:
            with hooks.run_with(model, [bad]):
                pass
        msg = str(e.value)
        assert "resid_post.2" in msg and "mlp_post.0" in msg and "attn_head_out.1.0..3" in msg, msg
    with pytest.raises(InputError, match="function"):
        with hooks.run_with(model, ["resid_post.0"], interventions={"mlp_out.0": 3.0}):
            pass
    # a failed registration leaves no hooks behind (transformers keeps hooks of its own: count, don't assume none)
    assert _n_hooks(model) == before


def test_unsupported_architecture_names_supported_families():
    from transformers import OPTConfig

    with pytest.raises(InputError) as e:
        family_of(OPTConfig())
    assert "opt" in str(e.value) and all(f in str(e.value) for f in ("gpt_neox", "gpt2", "llama", "qwen2"))


def test_random_config_shapes():
    cfg = random_config("gpt2", n_layers=2, d_model=32, n_heads=2, d_mlp=48, vocab_size=50)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_inner, cfg.vocab_size) == (2, 32, 48, 50)
    with pytest.raises(InputError, match="gpt_neox"):
        random_config("bert")

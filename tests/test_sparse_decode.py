"""Sparse decode (TopK, BatchTopK) against the dense ``f @ W_dec`` it replaces: the same forward and
the same gradients for every parameter, including with ties and zero pre-activations, with the
AuxK term active, in training and in inference; the same weights after training through ``fit``;
and the before/after bench's JSON.

Tolerance: float32 throughout; forward values, losses and gradients must agree to
``rtol = atol = 1e-5`` (the two paths sum the same products in different orders, which gives
differences of order 1e-6 here); weights after 12 Adam steps through ``fit`` to the same
``rtol = atol = 1e-5`` (observed: ≤ 1e-7, while training moved them by ≈ 3e-2).
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import saeray.sae.batchtopk as batchtopk_mod
import saeray.sae.topk as topk_mod
from saeray.sae.batchtopk import BatchTopKSAE
from saeray.sae.sparse_decode import decode_coo, decode_topk
from saeray.sae.topk import TopKSAE
from saeray.sae.train import TrainConfig, Variant, fit

torch.set_num_threads(1)
TOL = {"rtol": 1e-5, "atol": 1e-5}
D, WIDTH, K, B = 16, 96, 4, 48


def _close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def test_decode_functions_match_dense_with_grads():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(WIDTH, D, generator=g)
    idx = torch.rand(B, WIDTH, generator=g).topk(K, dim=1).indices
    vals = torch.randn(B, K, generator=g)
    vals[::5] = 0.0                                               # whole rows of zeros
    gout = torch.randn(B, D, generator=g)

    def dense(v, Wd):
        return torch.zeros(B, WIDTH).scatter(1, idx, v) @ Wd

    for fn in (lambda v, Wd: decode_topk(idx, v, Wd),
               lambda v, Wd: decode_coo(torch.arange(B).repeat_interleave(K), idx.flatten(), v.flatten(), Wd, B)):
        got = [t.clone().requires_grad_() for t in (vals, W)]
        ref = [t.clone().requires_grad_() for t in (vals, W)]
        out, out_ref = fn(*got), dense(*ref)
        _close(out, out_ref, "decode")
        (out * gout).sum().backward()
        (out_ref * gout).sum().backward()
        _close(got[0].grad, ref[0].grad, "grad vals")
        _close(got[1].grad, ref[1].grad, "grad W_dec")

    # variable active set with empty tokens (BatchTopK's case)
    rows = torch.tensor([0, 0, 0, 2, 5, 5])
    cols = torch.tensor([3, 7, 1, 3, 0, 95])
    v = torch.randn(6, generator=g)
    f = torch.zeros(7, WIDTH).index_put_((rows, cols), v)
    _close(decode_coo(rows, cols, v, W, 7), f @ W, "decode_coo with empty tokens")


def _tied_sae(cls, training: bool, **kw):
    """An SAE whose pre-activations have exact ties (duplicated encoder columns) and, for all-zero
    inputs with zero biases, rows of exact zeros; a third of the latents dead, so AuxK is active."""
    torch.manual_seed(1)
    sae = cls(D, WIDTH, k=K, k_aux=6, **kw)
    with torch.no_grad():
        sae.W_enc[:, 1::2] = sae.W_enc[:, 0::2]                    # latent 2j+1 ties latent 2j
        sae.W_dec.mul_(torch.rand(WIDTH, 1) + 0.5)                 # rows of differing norm
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    sae.dead_tokens = 100
    sae.tokens_since_fired[: WIDTH // 3] = 1000
    sae.train(training)
    return sae


def _batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, D, generator=g)
    x[::4] = 0.0                                                  # pre = 0 everywhere on these tokens
    x[1::6] = x[2::6]                                             # duplicated tokens
    return x


def _forward_backward(sae, x):
    for p in sae.parameters():
        p.grad = None
    out = sae(x)
    loss = sum(out.losses.values())
    loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


def _compare(sparse, x):
    dense = copy.deepcopy(sparse)
    dense.sparse_decode = False
    out_s, g_s = _forward_backward(sparse, x)
    out_d, g_d = _forward_backward(dense, x)
    assert out_s.codes is not None and out_d.codes is None       # the two paths really differ
    _close(out_s.recon, out_d.recon, "recon")
    _close(out_s.latents, out_d.latents.detach(), "latents")
    _close(out_s.fired(), out_d.fired(), "fired")
    _close(out_s.positive_values().sort().values, out_d.positive_values().sort().values, "positive values")
    assert out_s.losses.keys() == out_d.losses.keys()
    for k in out_s.losses:
        _close(out_s.losses[k], out_d.losses[k], f"loss {k}")
    if sparse.training:
        assert float(out_d.losses["auxk"].detach()) > 0                    # the AuxK decode is exercised
        assert set(g_s) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for n in g_d:
        assert g_d[n].abs().sum() > 0, n
        _close(g_s[n], g_d[n], f"grad {n}")


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("training", [True, False])
def test_sparse_equals_dense_forward_and_grads(cls, training):
    sae = _tied_sae(cls, training)
    x = _batch()
    pre = sae.pre_acts(x * sae.input_scale)
    assert (pre[::4] == 0).all()                                  # ties at zero present
    if cls is BatchTopKSAE and not training:
        sae.threshold.fill_(0.2)                                  # the inference (global threshold) path
    _compare(sae, x)


def test_batchtopk_keeps_zeros_when_few_positive():
    """Fewer positive activations than B·k: the batch top-k keeps zeros; both paths agree."""
    sae = _tied_sae(BatchTopKSAE, True)
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)                                     # almost everything negative
    x = _batch()
    n_pos = int((sae.pre_acts(x) > 0).sum())
    assert n_pos < B * K
    _compare(sae, x)


def test_comparison_catches_a_wrong_sparse_decode(monkeypatch):
    """The equality checks above fail if the sparse decode drops one active latent per token."""
    def wrong(idx, vals, W_dec):
        return F.embedding_bag(idx[:, :-1], W_dec, per_sample_weights=vals[:, :-1].to(W_dec.dtype), mode="sum")

    monkeypatch.setattr(topk_mod, "decode_topk", wrong)
    with pytest.raises(AssertionError):
        _compare(_tied_sae(TopKSAE, True), _batch())

    def wrong_coo(rows, cols, vals, W_dec, n_rows):
        return decode_coo(rows, cols, vals.relu() * 0.999, W_dec, n_rows)

    monkeypatch.setattr(batchtopk_mod, "decode_coo", wrong_coo)
    with pytest.raises(AssertionError):
        _compare(_tied_sae(BatchTopKSAE, True), _batch())


def _data(n, d=D, seed=0):
    g = np.random.default_rng(seed)
    dirs = g.normal(size=(40, d))
    codes = (g.random((n, 40)) < 0.1) * g.random((n, 40))
    return (codes @ dirs + 0.01 * g.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fit_sparse_and_dense_give_same_weights(arch, monkeypatch):
    steps, bs = 12, 64
    x = _data(steps * bs + 512)

    def batches(skip):
        for i in range(skip, steps * bs, bs):
            yield x[i:i + bs]

    cfg = TrainConfig(tokens=steps * bs, batch_size=bs, lr=3e-3, warmup_steps=2, log_every=1,
                      dead_window_tokens=3 * bs, checkpoint_every=0, init_tokens=512)
    variants = [Variant(arch, WIDTH, k=K)]
    res = {}
    for sparse in (True, False):
        monkeypatch.setattr(TopKSAE, "sparse_decode", sparse)
        calls, per_step = [], []
        real = F.embedding_bag
        monkeypatch.setattr(F, "embedding_bag", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        (sae, _), = fit(batches, D, variants, cfg, on_step=lambda s, m: per_step.extend(m.values())).values()
        monkeypatch.setattr(F, "embedding_bag", real)
        assert bool(calls) == sparse                               # the switch selects the path
        res[sparse] = (sae, per_step)
    (s_sae, s_m), (d_sae, d_m) = res[True], res[False]
    assert len(s_m) == len(d_m) == steps
    assert max(m["auxk"] for m in d_m) > 0                        # AuxK ran during training
    assert not torch.equal(d_sae.W_dec, _fresh(arch).W_dec)       # training moved the weights
    for n, p in d_sae.state_dict().items():
        torch.testing.assert_close(s_sae.state_dict()[n], p, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    for ms, md in zip(s_m, d_m):                                  # every step's losses and statistics
        for k in ("loss", "mse", "auxk", "l0", "fvu", "dead_frac"):
            assert ms[k] == pytest.approx(md[k], rel=1e-4, abs=1e-6), k

def _fresh(arch):
    """The untrained SAE ``fit`` starts from (same seed derivation as MultiTrainer)."""
    import zlib

    from saeray.sae.registry import build

    torch.manual_seed(0 * 1_000_003 + zlib.crc32(Variant(arch, WIDTH, k=K).name.encode()))
    return build(arch, D, WIDTH, k=K)


def test_bench_train_json():
    cmd = [sys.executable, "-m", "saeray", "bench", "train", "--seconds", "0", "--rounds", "2", "--width", "64",
           "--width", "128", "--batch-size", "32", "--d-in", "16", "--k", "4", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["width"] for row in res["results"]] == [64, 128]
    for row in res["results"]:
        assert len(row["rounds"]["dense"]) == len(row["rounds"]["sparse"]) == 2
        assert row["dense_tokens_per_s"] > 0 and row["sparse_tokens_per_s"] > 0 and row["speedup"] > 0
    assert "speed-up" in r.stdout

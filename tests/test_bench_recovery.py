"""The family recovery benchmark's parts: its metrics, the reference loop, the target checks, and
the CLI's input errors (the full family is a benchmark, run by `saeray bench recovery --family`)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from saeray.bench.recovery_family import FAMILY, Setting, _checks, in_gba_range, mcc, run_setting, topk_k
from saeray.bench.reference_topk import reference_encode, train_reference_topk
from saeray.sae.synthetic import PlantedFeatures, recovery
from saeray.sae.base import width_scaled_lr


def test_mcc_is_one_for_the_true_code_and_low_for_noise():
    pf = PlantedFeatures(d=16, n=32, f_min=0.01, f_max=0.2, seed=0)
    x, h = pf.sample(5000, np.random.default_rng(0))
    assert mcc(h, h) > 0.999
    assert mcc(h, 3.0 * h[:, ::-1]) > 0.999                     # order and scale do not matter
    rng = np.random.default_rng(1)
    assert mcc(h, rng.random((5000, 64)) * (rng.random((5000, 64)) < 0.05)) < 0.1
    assert mcc(h, np.zeros((5000, 8))) == 0.0                   # a dead dictionary scores nothing


def test_planted_correlated_groups_keep_marginals_and_co_occur():
    pf = PlantedFeatures(d=16, n=40, f_min=0.01, f_max=0.1, corr_frac=0.5, corr=0.9, seed=2)
    _, h = pf.sample(200_000, np.random.default_rng(0))
    np.testing.assert_allclose((h > 0).mean(0), pf.freq, atol=0.004)
    g = np.where(pf.group == 0)[0]
    a, b = g[np.argsort(pf.freq[g])]                             # rarer, more frequent
    # comonotone coupling: the rarer member mostly fires together with the other
    # P(b | a) ≥ P(both use the shared draw) = 0.9² = 0.81
    assert ((h[:, a] > 0) & (h[:, b] > 0)).mean() / (h[:, a] > 0).mean() > 0.78
    independent = [i for i in range(pf.n) if pf.group[i] < 0][:2]
    i, j = independent
    assert ((h[:, i] > 0) & (h[:, j] > 0)).mean() < 3 * pf.freq[i] * pf.freq[j] + 1e-4
    lognormal = PlantedFeatures(d=16, n=40, magnitude="lognormal", seed=2).sample(100_000, np.random.default_rng(0))[1]
    m = lognormal[lognormal > 0]
    assert abs(m.mean() - 1.0) < 0.03 and m.max() > 5.0          # mean 1, heavy right tail


def test_reference_loop_learns_planted_directions():
    pf = PlantedFeatures(d=16, n=24, f_min=0.02, f_max=0.2, noise=0.0, seed=4)
    torch.manual_seed(0)
    init = train_reference_topk(pf.batches(256, 256)(0), 16, 96, k=3, lr=0.0)   # random init only
    p = train_reference_topk(pf.batches(256, 256 * 600)(0), 16, 96, k=3)
    before, after = recovery(init["W_dec"].numpy(), pf.V, 0.8), recovery(p["W_dec"].numpy(), pf.V, 0.8)
    assert after["frr"] > 0.7 and after["mean_best_cos"] > before["mean_best_cos"] + 0.2, (before, after)
    z = reference_encode(p, torch.as_tensor(pf.sample(64, np.random.default_rng(0))[0]), 3)
    assert ((z != 0).sum(1) <= 3).all()


def test_one_setting_scores_every_architecture_with_its_defaults():
    r = run_setting(Setting("tiny", 8, 2, 1e-2, 1e-1, seed=0), tokens=20_480, batch_size=512)
    by = {row["arch"]: row for row in r["rows"]}
    assert set(by) == {"reference", "topk", "batchtopk", "gba", "relu", "gated", "jumprelu"}
    assert by["topk"]["k"] == topk_k(r["setting"]["true_l0"]) and by["gba"]["k"] is None
    # BatchTopK's budget is per batch: its k is the data's mean L0 itself, not TopK's ceil(1.5 L0)
    assert by["batchtopk"]["k"] == round(r["setting"]["true_l0"], 2) != by["topk"]["k"]
    # each architecture's default learning rate
    w = r["setting"]["width"]
    assert by["gba"]["lr"] == 2e-2 and by["topk"]["lr"] == by["relu"]["lr"] == width_scaled_lr(w) > 1e-3
    assert 0 <= by["gba"]["consistency_features"] <= 1
    for row in r["rows"]:
        assert 0 <= row["frr90"] <= row["frr80"] <= 1 and 0 <= row["mcc"] <= 1
    # TopK fires exactly k per token on held-out data
    assert abs(by["topk"]["l0"] - by["topk"]["k"]) < 1e-6
    assert r["setting"]["in_gba_range"] is True


def test_checks_name_each_missed_target():
    def res(gba, topk, ref, in_range=True):
        rows = [{"arch": "reference", "frr90": ref}, {"arch": "topk", "frr90": topk},
                {"arch": "batchtopk", "frr90": 1.0}, {"arch": "gba", "frr90": gba}]
        return {"setting": {"name": "s", "in_gba_range": in_range}, "rows": rows}
    assert _checks([res(0.95, 0.9, 0.8)])["passed"]
    miss = _checks([res(0.85, 0.7, 0.8)])["misses"]
    assert any("gba frr90 0.850 < 0.9" in m for m in miss) and any("topk frr90 0.700 < reference" in m for m in miss)
    assert _checks([res(0.5, 0.9, 0.4, in_range=False)])["passed"]   # outside GBA's range: no 0.9 target


def test_family_covers_the_axes():
    assert {s.d for s in FAMILY} == {32, 96, 256} and {s.per_dim for s in FAMILY} == {2, 8}
    assert {s.width_mult for s in FAMILY} == {1, 2, 4} and {s.magnitude for s in FAMILY} == {"uniform", "lognormal"}
    assert min(s.f_min for s in FAMILY) <= 1e-4 and max(s.f_max for s in FAMILY) >= 1e-1
    assert any(s.held_out for s in FAMILY) and all(in_gba_range(s) for s in FAMILY)


def test_cli_refuses_unknown_setting():
    p = subprocess.run([sys.executable, "-m", "saeray", "bench", "recovery", "--family", "--settings", "d96-mid,nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "nope" in p.stderr and "d96-mid" in p.stderr

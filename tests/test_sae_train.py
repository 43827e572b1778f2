"""The shared training loop: every architecture learns on planted features, exact resume,
GBA frequency control without a sparsity coefficient, and ``saeray train`` on a Parquet dataset."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saeray.sae import ARCHS, load
from saeray.sae.metrics import evaluate
from saeray.sae.synthetic import PlantedFeatures, recovery
from saeray.sae.train import MultiTrainer, TrainConfig, Variant, fit
from saeray.store import Store

torch.set_num_threads(1)
PF = PlantedFeatures(d=16, n=48, f_min=0.01, f_max=0.2, seed=3, spacing="random")  # the data these thresholds were set on
B = 256


def variants(width: int = 64) -> list[Variant]:
    return [Variant("relu", width, l1=0.3), Variant("topk", width, k=4), Variant("batchtopk", width, k=4),
            Variant("gated", width, l1=0.3), Variant("jumprelu", width, l1=0.03), Variant("gba", width, opts={"every": 10, "gamma_up": 0.05, "gamma_down": 0.05, "ltf": 1e-3}, name=f"gba-w{width}")]  # a 2,560-token window resolves targets down to ~1e-3


@pytest.fixture(scope="module")
def trained():
    cfg = TrainConfig(tokens=60 * B * 10, batch_size=B, lr=3e-3, warmup_steps=20, dead_window_tokens=20 * B,
                      checkpoint_every=0, log_every=50)
    x_eval = PF.sample(8192, np.random.default_rng(99))[0]
    before = MultiTrainer(PF.d, variants(), cfg)
    before.init_from_data(PF.batch(0, cfg.init_tokens))
    fvu0 = {k: evaluate(s, x_eval)["fvu"] for k, s in before.saes.items()}
    res = fit(PF.batches(B, cfg.tokens), PF.d, variants(), cfg)
    return res, fvu0, x_eval


def test_every_arch_trains_and_reduces_fvu(trained):
    res, fvu0, x_eval = trained
    assert {v.arch for v in variants()} == set(ARCHS)
    for name, (sae, m) in res.items():
        ev = evaluate(sae, x_eval)
        assert ev["fvu"] < 0.5 * fvu0[name], (name, fvu0[name], ev["fvu"])
        # GBA's L0 is fixed by its target frequencies (≈ width × mean TAF ≈ 1.4 here), so it trades FVU
        assert ev["fvu"] < (0.8 if sae.arch == "gba" else 0.5), (name, ev)
        assert ev["l0"] < 0.5 * sae.width, (name, ev["l0"])  # sparse, not dense codes
        assert m["tokens"] == 60 * B * 10
    # TopK is exactly k per token; BatchTopK averages k in training, thresholded at inference
    assert 3.9 < evaluate(res["topk-w64-k4"][0], x_eval)["l0"] <= 4.0
    assert 2.0 < evaluate(res["batchtopk-w64-k4"][0], x_eval)["l0"] < 8.0


def test_batchtopk_takes_a_fractional_k_as_its_mean_per_token():
    from saeray.errors import InputError
    from saeray.sae.registry import build

    sae = build("batchtopk", 16, 64, k=1.5)
    sae.train()
    x = torch.as_tensor(PF.sample(1000, np.random.default_rng(0))[0])
    out = sae(x)
    # round(1.5 · 1000) entries kept in the batch, unevenly over tokens
    assert int((out.latents > 0).sum()) == 1500
    per_token = (out.latents > 0).sum(1)
    assert per_token.max() > per_token.min()
    assert sae.hparams()["k"] == 1.5 and ARCHS["batchtopk"](16, 64, **sae.hparams()).k == 1.5
    # TopK keeps a whole number per token: a fractional k is refused with the reason
    with pytest.raises(InputError, match="whole number"):
        build("topk", 16, 64, k=1.5)
    with pytest.raises(InputError, match="at most the width"):
        build("batchtopk", 16, 64, k=64.5)


def test_spec_keeps_an_integer_k_and_allows_a_fractional_one_for_batchtopk():
    from pydantic import ValidationError

    from saeray.spec import SAEVariant

    assert type(SAEVariant(arch="topk", width=64, k=32).k) is int    # the manifest and spec hash unchanged
    assert SAEVariant(arch="batchtopk", width=64, k=2.5).k == 2.5
    with pytest.raises(ValidationError, match="whole number"):
        SAEVariant(arch="topk", width=64, k=2.5)
    with pytest.raises(ValidationError):
        SAEVariant(arch="batchtopk", width=64, k=0)


def test_gba_tracks_group_frequencies_without_l1(trained):
    res, _, x_eval = trained
    sae = res["gba-w64"][0]
    assert "l1" not in sae.hparams() and set(sae(torch.as_tensor(x_eval[:8])).losses) == {"mse"}
    freq = evaluate(sae, x_eval)["freq"]
    rows = sae.group_frequencies(freq)
    # no group fires much above its target, and higher-target groups fire more
    for r in rows:
        assert r["median"] <= 2.0 * r["target"], rows  # a 2,560-token window resolves 1e-3 only coarsely
    meds = [r["median"] for r in rows]
    assert meds[0] > meds[-1] * 5
    assert np.corrcoef(np.log([r["target"] for r in rows]), np.log(np.maximum(meds, 1e-6)))[0, 1] > 0.8
    assert float(sae.bias.max()) <= 0.0 and float(sae.bias.min()) >= -1.0


def test_gba_scales_each_groups_direction_step():
    """One step from the same weights and batch with step_balance 0 (the default) and 0.5: group 0's
    rows move alike, a group with target p moves (HTF/p)^0.5 as far (the trainer applies the factor)."""
    cfg = TrainConfig(tokens=4 * B, batch_size=B, lr=1e-3, warmup_steps=0, checkpoint_every=0, log_every=1)
    opts = {"ltf": 1e-3, "every": 1000}
    vs = [Variant("gba", 64, seed=0, name="flat", opts={**opts, "step_balance": 0.0}),
          Variant("gba", 64, seed=0, name="balanced", opts={**opts, "step_balance": 0.5})]
    tr = MultiTrainer(PF.d, vs, cfg)
    tr.init_from_data(PF.batch(0, cfg.init_tokens))
    before = tr.saes["flat"].W.detach().clone()
    assert torch.equal(before, tr.saes["balanced"].W)
    tr.step(PF.batch(1, B))
    moved = {k: (s.W.detach() - before).norm(dim=1) for k, s in tr.saes.items()}
    sae = tr.saes["balanced"]
    want = (sae.htf / sae.target) ** 0.5
    live = moved["flat"] > 1e-6                       # rows that fired in the batch
    assert live.sum() > 20 and want.max() > 9
    ratio = moved["balanced"][live] / moved["flat"][live]
    assert torch.allclose(ratio, want[live], rtol=0.05), torch.stack([ratio, want[live]])
    assert tr.saes["flat"].row_step_scale() is None and ARCHS["gba"](PF.d, 64).row_step_scale() is None


def test_gba_bias_init_at_target_starts_each_neuron_at_its_groups_frequency():
    """bias_init "target": after the trainer's data init each neuron fires on its init sample at its
    group's target (the quantile it was set from), inside the controller's [-1, 0]; "zero" (the
    default) leaves every bias at 0, where a centred neuron fires about half the time."""
    cfg = TrainConfig(tokens=4 * B, batch_size=B, warmup_steps=0, checkpoint_every=0, log_every=1)
    vs = [Variant("gba", 64, seed=0, name="zero"),
          Variant("gba", 64, seed=0, name="target", opts={"ltf": 1e-3, "bias_init": "target"})]
    tr = MultiTrainer(PF.d, vs, cfg)
    sample = PF.batch(0, cfg.init_tokens)
    tr.init_from_data(sample)
    assert torch.equal(tr.saes["zero"].bias, torch.zeros(64))
    sae = tr.saes["target"]
    assert float(sae.bias.max()) <= 0.0 and float(sae.bias.min()) >= -1.0
    with torch.no_grad():
        fired = (sae(torch.as_tensor(sample)).pre > 0).float().mean(0)
    free = (sae.bias > -1.0) & (sae.bias < 0.0)          # not held by the clamp
    assert free.sum() > 40
    assert torch.allclose(fired[free], sae.target[free], rtol=0.1, atol=2.0 / len(sample))
    with pytest.raises(ValueError, match="bias_init"):
        ARCHS["gba"](PF.d, 64, bias_init="quantile")


def _final_weights(res):
    return {k: {n: t.detach().clone() for n, t in s.state_dict().items()} for k, (s, _) in res.items()}


class _Stop(Exception):
    pass


def test_exact_resume(tmp_path):
    cfg = TrainConfig(tokens=30 * B, batch_size=B, lr=3e-3, warmup_steps=5, dead_window_tokens=5 * B,
                      checkpoint_every=7, log_every=1)
    vs = lambda: variants(32)  # noqa: E731
    full = _final_weights(fit(PF.batches(B, cfg.tokens), PF.d, vs(), cfg))

    store = Store.open(str(tmp_path / "ckpt"))

    def crash(step, m):
        if step == 17:  # last checkpoint at step 14: three steps of work are lost and redone
            raise _Stop()
    with pytest.raises(_Stop):
        fit(PF.batches(B, cfg.tokens), PF.d, vs(), cfg, ckpt=store, on_step=crash)
    seen = []
    resumed = _final_weights(fit(PF.batches(B, cfg.tokens), PF.d, vs(), cfg, ckpt=store,
                                 on_step=lambda s, m: seen.append(s)))
    assert seen[0] == 15 and seen[-1] == 30
    for name in full:
        for t in full[name]:
            assert torch.equal(full[name][t], resumed[name][t]), (name, t)
    # a finished run is not retrained
    again = fit(PF.batches(B, cfg.tokens), PF.d, vs(), cfg, ckpt=store, on_step=lambda s, m: seen.append(-1))
    assert -1 not in seen and torch.equal(again["topk-w32-k4"][0].W_dec, resumed["topk-w32-k4"]["W_dec"])


def test_resume_refuses_other_settings(tmp_path):
    from saeray.errors import InputError

    cfg = TrainConfig(tokens=4 * B, batch_size=B, checkpoint_every=2)
    store = Store.open(str(tmp_path / "c"))
    fit(PF.batches(B, cfg.tokens), PF.d, [Variant("topk", 32, k=4)], cfg, ckpt=store)
    with pytest.raises(InputError, match="different SAE variants"):
        fit(PF.batches(B, cfg.tokens), PF.d, [Variant("topk", 32, k=5)], cfg, ckpt=store)


def _write_parquet(folder, n_files=3, rows=1500):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_files):
        x, _ = PF.sample(rows, rng)
        acts = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), PF.d)
        t = pa.table({"doc": pa.array(np.arange(rows), pa.int64()), "act": acts})
        pq.write_table(t, folder / f"part-{i}.parquet")


def test_train_cli_on_parquet(tmp_path):
    data, out = tmp_path / "acts", tmp_path / "sae"
    _write_parquet(data)
    cmd = [sys.executable, "-m", "saeray", "train", "--activations", str(data), "--arch", "topk", "--width", "32",
           "--k", "4", "--tokens", "9000", "--batch-size", "256", "--lr", "3e-3", "--out", str(out), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["out"].endswith("sae") and res["tokens"] == 9000
    assert res["metrics"]["fvu"] < 0.5 and 3.9 < res["metrics"]["l0"] <= 4.0
    sae = load(res["out"])
    info = json.loads((out / "saeray.json").read_text())
    assert info["arch"] == "topk" and info["provenance"]["rows"] == 4500
    x = torch.as_tensor(PF.sample(512, np.random.default_rng(5))[0])
    with torch.no_grad():
        assert evaluate(sae, x)["fvu"] < 0.5
    # bad input: exit code 2 with a message naming the problem
    p2 = subprocess.run([sys.executable, "-m", "saeray", "train", "--activations", str(data), "--arch", "topk",
                         "--width", "32", "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert p2.returncode == 2 and "needs k" in p2.stderr


def test_planted_frequencies_and_recovery_metric():
    pf = PlantedFeatures(d=32, n=64, f_min=2e-3, f_max=2e-1, seed=5)
    # geometric spacing: exactly two orders of magnitude, same profile for every seed
    np.testing.assert_allclose(np.sort(pf.freq), np.geomspace(2e-3, 2e-1, 64))
    np.testing.assert_allclose(np.sort(PlantedFeatures(d=32, n=64, f_min=2e-3, f_max=2e-1, seed=6).freq),
                               np.sort(pf.freq))
    np.testing.assert_allclose(np.linalg.norm(pf.V, axis=1), 1.0, rtol=1e-5)
    x, h = pf.sample(20_000, np.random.default_rng(0))
    assert (h >= 0).all() and abs((h > 0).sum(1).mean() - pf.expected_l0()) < 0.1
    # the metric: scaled, sign-preserved true directions among distractors are all recovered ...
    rng = np.random.default_rng(1)
    dirs = np.concatenate([3.0 * pf.V[::-1], rng.standard_normal((100, 32))])
    r = recovery(dirs, pf.V)
    assert r["frr"] == 1.0 and abs(r["mean_best_cos"] - 1.0) < 1e-5
    # ... a direction tilted by 30° (cos 0.866) is not, and flipped directions do not count
    tilt = np.cos(np.pi / 6) * pf.V[0] + np.sin(np.pi / 6) * np.linalg.qr(np.stack([pf.V[0], rng.standard_normal(32)]).T)[0][:, 1]
    assert recovery(np.concatenate([tilt[None], pf.V[1:]]), pf.V)["frr"] == 63 / 64
    assert recovery(-pf.V, pf.V)["frr"] == 0.0


def _harvested_run(tmp_path, hp="resid_post.0", units=3, rows=1200):
    """A target folder as the harvest leaves it: unit files of one hook point and their records."""
    from saeray.harvest.writer import UnitWriter
    from saeray.run.records import Records

    run = Store.open(str(tmp_path / "run"))
    recs = Records(run, "harvest")
    w = UnitWriter(run, {hp: PF.d}, "float32", {"model": "planted"})
    rng = np.random.default_rng(0)
    for u in range(units):
        w.begin(f"{u:05d}")
        x, _ = PF.sample(rows, rng)
        z = np.zeros(rows, np.int64)
        w.add(hp, z, z, z, x)
        recs.put(f"{u:05d}", {"rows": rows, "files": w.finish()})
    recs.consolidate()
    return run, hp


def test_train_cli_and_audit_unit_give_the_same_sae(tmp_path):
    """One training path: `saeray train` on a harvested hook point and the audit's training unit on
    the same run produce identical weights for every architecture's defaults (GBA's run-length
    controller and each architecture's default learning rate included)."""
    from safetensors.torch import load_file

    from saeray.sae.run import train_on_activations
    from saeray.train.unit import UnitConfig, train_unit

    run, hp = _harvested_run(tmp_path)
    # a GBA with its range moved (sae.architectures[].htf / --htf) and a TopK with its AuxK sized
    # (k_aux / --k-aux) take the same path
    archs = [("gba", None, None, {}), ("topk", 4, None, {}), ("jumprelu", None, 0.03, {}), ("gba", None, None, {"htf": 0.01}),
             ("topk", 4, None, {"k_aux": 2})]
    unit = train_unit(UnitConfig(run_url=run.url, store_options={}, hookpoint=hp, tokens=6000, batch_size=256,
                                 variants=[{"arch": a, "width": 32, "k": k, "l1": l1, "opts": o} for a, k, l1, o in archs]))
    for a, k, l1, o in archs:
        name = Variant(a, 32, k=k, l1=l1, opts=o).name
        cli = train_on_activations(run.url_of(f"acts/{hp}"), a, 32, str(tmp_path / f"cli-{name}"), k=k, l1=l1,
                                   tokens=6000, batch_size=256, device="cpu", opts=o)
        w_cli = load_file(str(tmp_path / f"cli-{name}" / "sae_weights.safetensors"))
        w_unit = load_file(run.path(f"saes/{hp}/{name}/sae_weights.safetensors"))
        assert set(w_cli) == set(w_unit)
        for t in w_cli:
            assert torch.equal(w_cli[t], w_unit[t]), (name, t)
        cfg_cli = json.loads((tmp_path / f"cli-{name}" / "saeray.json").read_text())
        cfg_unit = json.loads(open(run.path(f"saes/{hp}/{name}/saeray.json")).read())
        assert cfg_cli["hparams"] == cfg_unit["hparams"], name
        assert cli["tokens"] == unit[name]["tokens"] == 6000
    assert set(unit) == {"gba-w32", "topk-w32-k4", "jumprelu-w32-l10.03", "gba-w32-htf0.01", "topk-w32-k4-k_aux2"}
    assert json.loads((tmp_path / "cli-topk-w32-k4-k_aux2" / "saeray.json").read_text())["hparams"]["k_aux"] == 2
    moved = json.loads((tmp_path / "cli-gba-w32-htf0.01" / "saeray.json").read_text())["hparams"]
    assert moved["htf"] == 0.01 and moved["ltf"] == 1e-4
    gba = json.loads((tmp_path / "cli-gba-w32" / "saeray.json").read_text())
    # 24 steps: the controller is sized to the run (window of one batch), not the paper's 50 steps
    assert gba["hparams"]["every"] == 1 and gba["training"]["last_batch"]["lr"] == 2e-2


def test_encoder_backward_matches_autograd():
    """The encoder's hand-written backward (b_dec's gradient from the batch sum) equals autograd's."""
    from saeray.sae.base import _Encode

    g = torch.Generator().manual_seed(0)
    x, b_dec = torch.randn(257, 24, generator=g), torch.randn(24, generator=g, requires_grad=True)
    W, b = torch.randn(24, 96, generator=g, requires_grad=True), torch.randn(96, generator=g, requires_grad=True)
    up = torch.randn(257, 96, generator=g)
    ref = ((x - b_dec) @ W + b)
    grads_ref = torch.autograd.grad((ref * up).sum(), (b_dec, W, b))
    out = _Encode.apply(x, b_dec, W, b)
    grads = torch.autograd.grad((out * up).sum(), (b_dec, W, b))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    assert grads[0].abs().max() > 1.0   # a real gradient reaches b_dec

"""The audit end to end on a real local Ray (tiny random GPT-NeoX with the storyworld tokenizer):
harvest -> train (Ray Train, one run per hook point) -> evaluate inside the model -> report;
re-runs skip finished work; a killed training worker resumes from its checkpoint; CE loss
recovered is 1 for an SAE that reconstructs exactly and 0 for one that outputs zeros."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from saeray.evaluate.concepts import ConceptScorer, auroc
from saeray.run.audit import open_run, run_audit, run_targets
from saeray.spec import parse_spec

from conftest import run_and_kill_child


def make_spec(model: str, store: str, name: str = "aud", **over):
    d = {"name": name, "model": {"name": model},
         "corpus": {"n_docs": 64, "context_len": 64, "heldout_docs": 32, **over.pop("corpus", {})},
         "hookpoints": over.pop("hookpoints", ["resid_post.1", "resid_post.3"]),
         "harvest": {"batch_size": 16, "unit_contexts": 32},
         "sae": {"architectures": over.pop("architectures", [{"arch": "topk", "width": 64, "k": 4},
                                                             {"arch": "relu", "width": 64, "l1": 1.0}]),
                 "train": {"tokens": 6000, "batch_size": 200, "checkpoint_every": 5, **over.pop("train", {})}},
         # the concept probes and dashboards have their own tests; on where a test asks (over)
         "evaluation": {"pipelines": 2, "batch_size": 16, "probes": over.pop("probes", False)},
         "dashboards": {"enabled": over.pop("dashboards", False)},
         "store": store,
         "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5}, "eval": {"num_cpus": 0.5}}}
    return parse_spec(json.dumps(d))


def test_audit_end_to_end_and_rerun_skips(ray_local, tiny_model, tmp_path):
    # a GBA with its target range moved in the spec (docs/training.md) runs through every stage
    archs = [{"arch": "topk", "width": 64, "k": 4}, {"arch": "relu", "width": 64, "l1": 1.0},
             {"arch": "gba", "width": 64, "htf": 0.05}]
    spec = make_spec(tiny_model, str(tmp_path / "store"), probes=True, dashboards=True, architectures=archs)
    summary = run_audit(spec)
    root = tmp_path / "store" / "aud"
    run = root / "targets" / "neox@main"
    on_disk = json.loads((root / "report" / "summary.json").read_text())
    assert len(on_disk["saes"]) == 6
    gba = [r for r in on_disk["saes"] if r["arch"] == "gba"]
    assert {r["name"] for r in gba} == {"gba-w64-htf0.05"} and all(r["opts"] == "htf 0.05" for r in gba)
    saved = json.loads((run / "saes" / "resid_post.1" / "gba-w64-htf0.05" / "saeray.json").read_text())
    assert saved["hparams"]["htf"] == 0.05 and saved["hparams"]["ltf"] == 1e-4
    for row in on_disk["saes"]:
        for k in ("model", "revision", "hookpoint", "arch", "width", "l0", "fvu", "ce_loss_recovered", "kl", "dead_frac",
                  "concepts_f1_0.8", "path"):
            assert k in row and row[k] is not None, k
        assert (run / "saes" / row["hookpoint"] / row["name"] / "sae_weights.safetensors").is_file()
        assert 0 <= row["dead_frac"] <= 1 and row["kl"] >= 0 and row["fvu"] >= 0
        if row["arch"] == "topk":
            assert row["l0"] == pytest.approx(4.0)
        assert row["n_concepts"] >= 8    # storyworld labels scored
    assert on_disk["saes"][0]["revision"] == "main" and on_disk["saes"][0]["model"] == tiny_model
    assert set(on_disk["stage_wall_s"]) == {"neox@main", "report"}
    assert set(on_disk["stage_wall_s"]["neox@main"]) == {"harvest", "train", "evaluate", "presence", "sweeps",
                                                          "dashboards"}
    html = (root / "report" / "index.html").read_text()
    assert "resid_post.3" in html and "data:image/png;base64," in html
    assert "<th" in html and ">options<" in html and ">htf 0.05<" in html
    assert (root / "report" / "l0_vs_fvu.png").stat().st_size > 1000
    assert summary["report"].endswith("report/index.html")
    # the saved SAEs load back and match the evaluation's FVU order of magnitude
    from saeray.sae import load

    sae = load(on_disk["saes"][0]["path"])
    assert sae.d_in == 32
    # a second run over a finished audit: everything skipped, nothing retrained
    mtime = (run / "saes" / "resid_post.1" / "topk-w64-k4" / "sae_weights.safetensors").stat().st_mtime
    t0 = time.monotonic()
    run_audit(spec)
    assert time.monotonic() - t0 < 15
    assert (run / "saes" / "resid_post.1" / "topk-w64-k4" / "sae_weights.safetensors").stat().st_mtime == mtime
    # changed SAE settings on a finished run: refused, naming what changed, nothing overwritten
    from saeray.errors import InputError

    changed = make_spec(tiny_model, str(tmp_path / "store"), architectures=[{"arch": "topk", "width": 32, "k": 4}])
    with pytest.raises(InputError, match=r"finished stage 'train' with other settings \(sae.architectures changed\)"):
        run_audit(changed)
    assert (run / "saes" / "resid_post.1" / "topk-w64-k4" / "sae_weights.safetensors").stat().st_mtime == mtime


def _exact_and_null_saes(run_store, hp: str, d: int):
    """Write two hand-built SAEs into the run: one reconstructs x exactly (W_dec = [I; -I] on
    relu(±x)), one outputs zeros; record them as the trained SAEs of ``hp``."""
    from saeray.sae import io
    from saeray.sae.relu import ReLUSAE

    exact = ReLUSAE(d, 2 * d, l1=0.0)
    null = ReLUSAE(d, 2 * d, l1=0.0)
    eye = torch.eye(d)
    with torch.no_grad():
        for s in (exact, null):
            s.b_enc.zero_()
            s.b_dec.zero_()
            s.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact.W_dec.copy_(torch.cat([eye, -eye], 0))
        null.W_dec.zero_()
    out = {}
    for name, s in (("exact", exact), ("null", null)):
        io.save(s, run_store / f"saes/{hp}/{name}", hook_name=hp)
        out[name] = {"path": f"saes/{hp}/{name}", "arch": "relu", "width": 2 * d, "k": None, "l1": 0.0, "tokens": 0,
                     "tokens_per_s": None, "train_sample": {}}
    return out


def test_ce_loss_recovered_is_one_for_exact_and_zero_for_null(ray_local, tiny_model, tmp_path):
    from saeray.evaluate.stage import run as run_evaluate
    from saeray.train.stage import TrainResult

    spec = make_spec(tiny_model, str(tmp_path / "store"), name="ce", hookpoints=["resid_post.2"])
    rc = open_run(spec)
    run_targets(rc, ["harvest"])
    ctx = rc.target(rc.targets[0])
    trained = TrainResult({"resid_post.2": _exact_and_null_saes(ctx.store, "resid_post.2", 32)})
    ev = run_evaluate(ctx, {"train": trained}).saes["resid_post.2"]
    assert ev["exact"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert ev["exact"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert ev["exact"]["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert ev["exact"]["l0"] == pytest.approx(32.0)            # relu(x) or relu(-x): one of each pair fires
    assert ev["null"]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert ev["null"]["loss_sae"] == pytest.approx(ev["null"]["loss_zero"], abs=1e-6)
    assert ev["exact"]["loss_zero"] != pytest.approx(ev["exact"]["loss_clean"], abs=1e-4)  # ablation matters


@pytest.mark.slow
def test_training_worker_killed_resumes_from_checkpoint(ray_local, tiny_model, tmp_path):
    kw = dict(hookpoints=["resid_post.2"], architectures=[{"arch": "topk", "width": 64, "k": 4}],
              train={"tokens": 200_000, "batch_size": 100, "checkpoint_every": 50})
    # the uninterrupted reference
    ref_rc = open_run(make_spec(tiny_model, str(tmp_path / "ref"), name="ref", **kw))
    run_targets(ref_rc, ["train"])
    ref = ref_rc.target(ref_rc.targets[0])
    # the same run, with its training worker SIGKILLed once a checkpoint exists
    rc = open_run(make_spec(tiny_model, str(tmp_path / "kill"), name="kill", **kw))
    run_targets(rc, ["harvest"])
    ctx = rc.target(rc.targets[0])
    ckpt = ctx.store / "saes/resid_post.2/_checkpoint"
    at_kill: dict = {}

    def checkpoint_written() -> bool:
        if ckpt.exists("checkpoint.pt"):
            at_kill["steps"] = torch.load(ckpt.path("checkpoint.pt"), weights_only=False)["steps"]
        return "steps" in at_kill

    killed, result = run_and_kill_child(lambda: run_targets(rc, ["train"]), "RayTrainWorker",
                                        ready=checkpoint_written, timeout=240, join_timeout=600)
    steps_at_kill = at_kill.get("steps", 0)
    assert killed is not None, "the worker must be killed mid-run for this test to mean anything"
    assert 0 < steps_at_kill < 2000
    assert "err" not in result, result.get("err")
    from saeray.sae import load

    a = load(ref.store.url_of("saes/resid_post.2/topk-w64-k4"))
    b = load(ctx.store.url_of("saes/resid_post.2/topk-w64-k4"))
    x = torch.randn(256, 32)
    # exact resume: same stream, same optimiser and RNG state -> the same SAE as without the crash
    torch.testing.assert_close(b(x).recon, a(x).recon, atol=1e-5, rtol=1e-4)


def test_concept_scorer_finds_the_planted_latent_and_exact_auroc():
    rng = np.random.default_rng(0)
    n, w = 4000, 50
    y = rng.random((n, 3)) < np.array([0.05, 0.2, 0.5])
    lat = np.abs(rng.normal(size=(n, w))) * (rng.random((n, w)) < 0.1)
    lat[:, 7] = y[:, 0] * (1 + rng.random(n))          # latent 7 fires exactly on concept 0
    lat[:, 13] = (y[:, 1] | (rng.random(n) < 0.02)) * 1.0   # latent 13 is a noisy detector of concept 1
    sc = ConceptScorer(w, 3)
    for i in range(0, n, 512):
        sc.add_counts(torch.tensor(lat[i:i + 512]), torch.tensor(y[i:i + 512]))
    sc.choose()
    for i in range(0, n, 512):
        sc.add_values(torch.tensor(lat[i:i + 512]), torch.tensor(y[i:i + 512]))
    r = sc.result(["c0", "c1", "c2"])
    assert r["concepts"]["c0"]["latent"] == 7 and r["concepts"]["c0"]["f1"] == pytest.approx(1.0)
    assert r["concepts"]["c0"]["auroc"] == pytest.approx(1.0)
    assert r["concepts"]["c1"]["latent"] == 13 and 0.8 < r["concepts"]["c1"]["f1"] < 1.0
    assert r["concepts_f1_0.8"] == 2
    # AUROC against the pairwise definition
    s, yy = rng.normal(size=300).round(1), rng.random(300) < 0.3
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[yy] for b in s[~yy]])
    assert auroc(s, yy) == pytest.approx(pairs)


def test_storyworld_concepts_align_with_tokens():
    from saeray.evaluate.concepts import storyworld_concepts
    from saeray.harvest.corpus import Corpus
    from saeray.spec import CorpusSpec
    from saeray.storyworld.generator import generate_doc
    from saeray.storyworld.tokenizer import build_tokenizer
    from saeray.storyworld.vocab import CATEGORIES

    c = Corpus(CorpusSpec(n_docs=1, context_len=64, heldout_docs=24), build_tokenizer()).heldout()
    names, Y = storyworld_concepts(c, seed=0)
    assert Y.shape == (int(c.keep.sum()), len(names))
    tok = build_tokenizer()
    words = tok.convert_ids_to_tokens(c.ids[c.keep].tolist())
    for cat in ("name", "number"):
        j = names.index(f"category={cat}")
        got = {w for w, f in zip(words, Y[:, j]) if f}
        assert got and got <= set(CATEGORIES[cat])
    assert generate_doc(0, 0, "heldout").words[0] == words[0]   # row 0 = doc 0, pos 1 (BOS dropped)


@pytest.mark.slow
def test_data_parallel_unit_matches_single_worker(ray_local, tiny_model, tmp_path):
    """sae.train.workers: 2 runs one hook point's SAEs as a 2-rank Ray Train run (gloo); the result
    matches the single-worker run up to float rounding."""
    from saeray.sae import load

    outs = {}
    for workers in (1, 2):
        kw = dict(hookpoints=["resid_post.2"], architectures=[{"arch": "relu", "width": 64, "l1": 1.0}],
                  train={"tokens": 12_000, "batch_size": 200, "workers": workers})
        rc = open_run(make_spec(tiny_model, str(tmp_path / f"w{workers}"), name=f"w{workers}", **kw))
        run_targets(rc, ["train"])
        ctx = rc.target(rc.targets[0])
        outs[workers] = load(ctx.store.url_of("saes/resid_post.2/relu-w64-l11"))
    x = torch.randn(512, 32)
    torch.testing.assert_close(outs[2](x).recon, outs[1](x).recon, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", ["no_sae", "layer_out_of_range", "too_many_stages", "no_heldout", "bad_revision"])
def test_spec_that_cannot_finish_fails_before_anything_runs(tiny_model, tmp_path, case):
    """Every stage checks the whole spec first: a spec that would fail midway (today: after the
    harvest) fails before Ray starts or anything is written, naming the field."""
    from saeray.errors import InputError

    d = {"name": "chk", "model": {"name": tiny_model}, "hookpoints": ["resid_post.1"],
         "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}]}, "store": str(tmp_path / "store")}
    want = {"no_sae": r"sae: the spec has no sae section",
            "layer_out_of_range": r"hookpoints \(.*neox@main\): .*resid_post\.7",
            "too_many_stages": r"harvest\.stages: 5 stages .* only 4 layers",
            "no_heldout": r"corpus\.heldout_docs: 0 held-out documents",
            "bad_revision": r"model\.revisions: .* has no revision 'step3'"}[case]
    if case == "no_sae":
        del d["sae"]
    elif case == "layer_out_of_range":
        d["hookpoints"] = ["resid_post.1", "resid_post.7"]
    elif case == "too_many_stages":
        d["harvest"] = {"stages": 5}
    elif case == "no_heldout":
        d["corpus"] = {"heldout_docs": 0}
    else:
        d["model"]["revisions"] = ["step3"]
    with pytest.raises(InputError, match=want):
        run_audit(parse_spec(json.dumps(d)))
    assert not (tmp_path / "store").exists()


def test_tradeoff_points_of_one_arch_at_one_hook_point_are_told_apart():
    """The trade-off plots mark the architecture; two variants of one architecture at one hook
    point get their distinguishing knob or options written beside them, a lone variant nothing."""
    from saeray.report.plots import tradeoff_png, variant_labels

    rows = [{"hookpoint": "h0", "arch": "relu", "width": 64, "k": None, "l1": 1.0, "l0": 3, "fvu": 0.2},
            {"hookpoint": "h0", "arch": "relu", "width": 64, "k": None, "l1": 3.0, "l0": 2, "fvu": 0.3},
            {"hookpoint": "h0", "arch": "gba", "width": 64, "k": None, "l1": None, "l0": 4, "fvu": 0.3},
            {"hookpoint": "h0", "arch": "gba", "width": 64, "k": None, "l1": None, "opts": "htf 0.02", "l0": 3, "fvu": 0.5},
            {"hookpoint": "h0", "arch": "topk", "width": 64, "k": 8, "l1": None, "l0": 8, "fvu": 0.05},
            {"hookpoint": "h1", "arch": "topk", "width": 32, "k": 8, "l1": None, "l0": 8, "fvu": 0.05},
            {"hookpoint": "h1", "arch": "topk", "width": 64, "k": 8, "l1": None, "l0": 8, "fvu": 0.04}]
    assert variant_labels(rows, lambda r: r["hookpoint"]) == ["l1 1", "l1 3", None, "htf 0.02", None, "w 32, k 8",
                                                              "w 64, k 8"]
    assert tradeoff_png(rows, "fvu", "FVU", "t")[:8] == b"\x89PNG\r\n\x1a\n"

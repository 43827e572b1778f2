"""Evaluation's intervention passes start at their hook point's block from the clean pass's kept
hidden states (saeray/evaluate/job.py): the CE and KL figures must equal those of full passes, and
the layers before the hook point must really be skipped."""
from __future__ import annotations

import pytest
import torch

from saeray.errors import InputError
from saeray.harvest.corpus import Corpus
from saeray.models.load import load_model
from saeray.models.pool import Load, PoolWorker, stage_ranges
from saeray.sae import io
from saeray.sae.registry import build
from saeray.spec import CorpusSpec

# one hook point per kind of place in a block, on both sides of the stage boundary (layers 0-1 | 2-3)
HOOKPOINTS = ["resid_pre.1", "resid_post.1", "mlp_out.2", "attn_head_out.3.1"]


@pytest.fixture(scope="module")
def batch(tiny_model):
    _, tok = load_model(tiny_model)
    return Corpus(CorpusSpec(n_docs=6, context_len=32), tok).contexts(0, 6)


@pytest.fixture(scope="module")
def sae_urls(tmp_path_factory):
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("saes")
    urls = {}
    for hp in HOOKPOINTS:
        urls[hp] = {"topk": io.save(build("topk", 32, 64, k=4), str(root / hp / "topk")),
                    "relu": io.save(build("relu", 32, 64, l1=1.0), str(root / hp / "relu"))}
    return urls


def _workers(tiny_model, sae_urls, resume: bool):
    from saeray.evaluate.job import EvalJob

    ranges = stage_ranges(4, 2)
    return [PoolWorker(Load(tiny_model), r, EvalJob,
                       {"saes": {hp: sae_urls[hp] for hp in HOOKPOINTS if r[0] <= int(hp.split(".")[1]) < r[1]},
                        "n_concepts": 0, "resume": resume})
            for r in ranges]


def _evaluate(workers, batch, blocks_run: list | None = None):
    modes = [("clean",)] + [m for hp in HOOKPOINTS for m in [("zero", hp), ("sae", hp, "topk"), ("sae", hp, "relu")]]
    handles = []
    if blocks_run is not None:   # which blocks execute, per mode
        for w in workers:
            for i, b in enumerate(w.stage.blocks):
                L = w.stage.start + i
                handles.append(b.register_forward_hook(lambda *_a, L=L: blocks_run[-1][1].append(L)))
    for w in workers:
        w.begin("b0")
    sent = {}
    for mode in modes:
        payload = {"mode": mode, "keep": batch.keep, "ids": batch.ids, "y": None}
        if blocks_run is not None:
            blocks_run.append((mode, []))
        x = batch.ids
        for w in workers:
            x = w.forward("b0", 0, x, payload)
            if w is workers[0]:
                sent[mode] = x
    for h in handles:
        h.remove()
    return workers[-1].finish("b0")["losses"], sent


def test_resumed_interventions_equal_full_passes_and_skip_the_layers_before(tiny_model, batch, sae_urls):
    full, _ = _evaluate(_workers(tiny_model, sae_urls, resume=False), batch)
    runs: list = []
    resumed, sent = _evaluate(_workers(tiny_model, sae_urls, resume=True), batch, runs)
    assert set(full) == set(resumed) and len(full) == 1 + 3 * len(HOOKPOINTS)
    for mode, (nll, n, kl) in full.items():
        r_nll, r_n, r_kl = resumed[mode]
        assert r_n == n
        assert r_nll == pytest.approx(nll, rel=1e-6), mode
        assert r_kl == pytest.approx(kl, rel=1e-5, abs=1e-9), mode
        if mode[0] != "clean":
            assert kl > 0, mode      # the interventions change the output: the comparison has teeth
    ran = dict((m, b) for m, b in runs)
    assert ran[("clean",)] == [0, 1, 2, 3]
    for hp in HOOKPOINTS:
        L = int(hp.split(".")[1])
        for mode in [("zero", hp), ("sae", hp, "topk")]:
            assert ran[mode] == list(range(L, 4)), mode
            # a stage wholly before the hook point's layer sends nothing: the next one has its state
            assert (sent[mode] is None) == (L >= 2), mode


def test_an_intervention_before_its_clean_pass_is_refused(tiny_model, batch, sae_urls):
    workers = _workers(tiny_model, sae_urls, resume=True)
    for w in workers:
        w.begin("b1")
    payload = {"mode": ("zero", "mlp_out.2"), "keep": batch.keep, "ids": batch.ids, "y": None}
    assert workers[0].forward("b1", 0, batch.ids, payload) is None
    with pytest.raises(RuntimeError, match="clean pass"):
        workers[1].forward("b1", 0, None, payload)


def test_start_layer_outside_the_stage_or_with_token_ids_is_an_input_error(tiny_model, batch):
    from saeray.models.shard import Stage

    st = Stage.from_pretrained(tiny_model, (2, 4))
    hidden = torch.zeros(2, 8, 32)
    with pytest.raises(InputError, match="start_layer 1 is not within"):
        st(hidden, start_layer=1)
    with pytest.raises(InputError, match="hidden states entering"):
        st(torch.zeros(2, 8, dtype=torch.long), start_layer=3)


def test_bench_evaluate_on_two_stages(tiny_model, tmp_path):
    """`saeray bench evaluate` times both ways on the spec's split and finds them equal; a spec
    without SAEs is refused with exit 2."""
    import json
    import subprocess
    import sys

    import yaml

    d = {"name": "b", "model": {"name": tiny_model}, "corpus": {"n_docs": 16, "context_len": 32, "heldout_docs": 8},
         "hookpoints": ["resid_post.0", "mlp_out.3"], "harvest": {"stages": 2},
         "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}, {"arch": "gba", "width": 64}]},
         "store": str(tmp_path / "store")}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "saeray", "bench", "evaluate", "--spec", str(spec), "--batch-size", "4",
                        "--batches", "2", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["stages"] == 2 and res["batches"] == 2 and res["passes"] == 2 * (1 + 2 * 3)
    # resid_post.0's 3 passes run 4 blocks, mlp_out.3's run 1: (4 + 3*4 + 3*1) / (7*4)
    assert res["block_share_resumed"] == pytest.approx(19 / 28, abs=1e-3)
    assert res["max_abs_diff_ce_per_token"] < 1e-6 and res["max_abs_diff_kl_per_token"] < 1e-6
    assert not (tmp_path / "store").exists()      # a bench writes nothing into the spec's store
    del d["sae"]
    spec.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "saeray", "bench", "evaluate", "--spec", str(spec)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no sae section" in r.stderr

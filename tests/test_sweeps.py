"""The sweep methods as plain functions (no Ray): GradSAE against finite differences, batched exact
ablation against one-latent-at-a-time ablation, the residual-stream shortcut against the whole
forward, selection, agreement statistics, answer scoring and the prompt sets."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saeray.errors import InputError
from saeray.models.random_init import random_model
from saeray.models.shard import split
from saeray.sae.registry import build
from saeray.sweeps.ablation import effect_one, exact_effects
from saeray.sweeps.agreement import agreement, pearson, spearman, topk_overlap
from saeray.sweeps.answers import exact_match, normalize, token_f1
from saeray.sweeps.gradsae import GradOptions, scores
from saeray.sweeps.job import greedy
from saeray.sweeps.masking import Edit, choose, decode_greedy, k_value
from saeray.sweeps.splice import clean_pass, decode, last_logits, output_of


def _setup(family: str, dtype=torch.float32, arch="topk"):
    m = random_model(family, n_layers=3, d_model=32, n_heads=4, vocab_size=64, seed=1).to(dtype)
    (stage,) = split(m, [])
    torch.manual_seed(2)
    sae = build(arch, 32, 96, k=8) if arch == "topk" else build(arch, 32, 96, l1=1.0)
    with torch.no_grad():   # latents that fire on this model's activations (random weights are tiny)
        sae.b_enc.fill_(0.1)
        sae.W_enc.mul_(3.0)
    sae = sae.to(dtype).eval()
    ids = torch.randint(1, 64, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    keep = [False, False] + [True] * 12     # BOS and one attention-sink position left alone
    return stage, sae, ids, keep


@pytest.mark.parametrize("error_term", [False, True])
@pytest.mark.parametrize("family,hp", [("gpt_neox", "resid_post.1"), ("gpt2", "resid_pre.2"), ("gpt_neox", "mlp_out.1")])
def test_gradsae_equals_finite_differences(family, hp, error_term):
    # float64 end to end (Llama-style RMSNorm computes in float32, too coarse for differences)
    stage, sae, ids, keep = _setup(family, torch.float64)
    c = clean_pass(stage, sae, hp, ids, keep)
    answer = int(c.logits.argmax())
    opt = GradOptions(error_term=error_term, ig_steps=0)
    sc = scores(stage, sae, hp, c, answer, opt)
    keep_t = torch.tensor(keep)

    def y(f):   # the whole forward with the edit as an intervention (not the resume shortcut scores use)
        new = decode(sae, f) + (c.err if error_term else 0.0)
        return float(output_of(last_logits(stage, hp, c.ids[None], keep_t, new[None]), answer).detach())

    T = len(ids)
    active = torch.nonzero((c.f > 0).any(0)).flatten()
    assert len(active) >= 5
    eps = 1e-6
    for lat in active[:6].tolist():
        relu_sum, signed = 0.0, 0.0
        for n in torch.nonzero(c.f[:, lat] > 0).flatten().tolist():
            fp, fm = c.f.clone(), c.f.clone()
            fp[n, lat] += eps
            fm[n, lat] -= eps
            g = (y(fp) - y(fm)) / (2 * eps)
            relu_sum += max(g * float(c.f[n, lat]), 0.0)
            signed += g * float(c.f[n, lat])
        assert float(sc["gradsae"][lat]) == pytest.approx(relu_sum / T, rel=1e-5, abs=1e-12)
        assert float(sc["signed"][lat]) == pytest.approx(signed, rel=1e-5, abs=1e-12)
    assert float(sc["activation"].sum()) == pytest.approx(float(c.f.sum()) / T)


@pytest.mark.parametrize("error_term", [False, True])
@pytest.mark.parametrize("family,hp", [("gpt_neox", "resid_post.0"), ("llama", "attn_out.1")])
def test_batched_exact_ablation_equals_one_at_a_time(family, hp, error_term):
    stage, sae, ids, keep = _setup(family)
    c = clean_pass(stage, sae, hp, ids, keep)
    answer = int(c.logits.argmax())
    active = torch.nonzero((c.f > 0).any(0)).flatten()
    y0, eff = exact_effects(stage, sae, hp, c, active, answer, "prob", error_term, batch=7)
    ref = torch.tensor([effect_one(stage, sae, hp, c, i, answer, "prob", error_term) for i in active.tolist()])
    torch.testing.assert_close(eff, ref, atol=2e-6, rtol=1e-4)
    assert eff.abs().max() > 1e-4       # the ablations do something
    if error_term:   # nothing edited: the unmodified model
        assert y0 == pytest.approx(float(torch.softmax(c.logits, -1)[answer]), abs=1e-5)


@pytest.mark.parametrize("hp", ["resid_post.0", "resid_post.2", "resid_pre.1"])
def test_resuming_at_the_residual_hook_point_equals_the_whole_forward(hp):
    stage, sae, ids, keep = _setup("llama")
    c = clean_pass(stage, sae, hp, ids, keep)
    rows = decode(sae, c.f)[None].repeat(3, 1, 1) * torch.tensor([1.0, 0.5, 0.0])[:, None, None]
    idt = c.ids[None].expand(3, -1)
    torch.testing.assert_close(last_logits(stage, hp, idt, c.keep, rows, c.hidden),
                               last_logits(stage, hp, idt, c.keep, rows), atol=1e-5, rtol=1e-5)


def test_splice_with_error_term_and_no_edit_decodes_like_the_model():
    stage, sae, ids, keep = _setup("gpt_neox")
    plain = greedy(stage, ids, 4)
    out = decode_greedy(stage, sae, "resid_post.1", ids, keep, [Edit(), Edit()], 4, error_term=True)
    assert out.tolist() == [plain, plain]
    # zeroing every latent everywhere (no error term) changes what the model says
    allz = decode_greedy(stage, sae, "resid_post.1", ids, keep, [Edit(zero_all=torch.arange(96))], 4)
    assert allz.shape == (1, 4)


def test_selection_of_top_and_bottom_k():
    s = torch.tensor([0.0, 0.5, -1.0, 0.2, 0.9, 0.1])
    assert choose(s, 2, "top").tolist() == [4, 1]
    assert choose(s, 2, "bottom").tolist() == [5, 3]
    assert choose(s, 10, "top").tolist() == [4, 1, 3, 5]      # never a non-positive score
    assert k_value("50%", 17) == 8 and k_value(10, 17) == 10 and k_value("50%", 1) == 1


def test_agreement_statistics():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties take the average rank: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4)
    assert spearman(np.array([0.0, 0.0, 1.0, 2.0]), a) == pytest.approx(pearson(np.array([1.5, 1.5, 3, 4]), a))
    assert pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])) is not None
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])))
    assert topk_overlap(np.array([5, 4, 3, 2, 1.0]), np.array([1, 4, 3, 2, 5.0]), 2) == 0.5
    assert agreement(a, a, 10)["topk_overlap"] == 1.0


def test_answers_are_scored_like_squad():
    assert normalize("The  Paris!") == "paris"
    assert exact_match("paris.", "Paris") == 1.0
    assert token_f1("new york city", "new delhi") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "x") == 0.0


def test_storyworld_fact_prompts_end_right_before_an_answer_not_in_context():
    from saeray.spec import CorpusSpec
    from saeray.storyworld.generator import generate_doc
    from saeray.storyworld.tokenizer import build_tokenizer
    from saeray.storyworld.vocab import FACTS
    from saeray.sweeps.prompts import build as build_set

    cs = CorpusSpec(heldout_docs=4, skip_first=1)
    ps = build_set("storyworld-facts", build_tokenizer(), cs, 12, min_len=20)
    assert len(ps.prompts) == 12
    for p in ps.prompts:
        doc_i, j = p.id[2:].split(".")
        doc = generate_doc(int(doc_i), 0, "heldout")
        words = p.text.split()
        assert len(words) == int(j) >= 20 and doc.words[:len(words)] == words
        assert doc.words[len(words)] == p.answer and p.answer not in words
        pos = len(words) + 1      # the answer's position (BOS is 0)
        assert doc.labels["is_fact_answer"][pos]
        assert FACTS[doc.labels["fact_relation"][pos]][doc.labels["fact_entity"][pos]] == p.answer
        assert len(p.ids) == len(words) + 1 and p.keep[:2] == [False, False] and all(p.keep[2:])
        assert len(p.answer_ids) == 1 and p.partner and p.partner != p.id
    assert int(ps.prompts[0].id[2:].split(".")[0]) >= 4     # after the documents evaluation reads


def test_jsonl_prompt_sets_are_checked(tmp_path):
    from saeray.storyworld.tokenizer import build_tokenizer
    from saeray.spec import CorpusSpec
    from saeray.sweeps.prompts import build as build_set

    good = tmp_path / "mine.jsonl"
    good.write_text('{"prompt": "at the farm . mia lives in", "answer": "quito"}\n\n{"id": "b", "prompt": "x", "answer": "the"}\n')
    ps = build_set(str(good), build_tokenizer(), CorpusSpec(), 10)
    assert ps.name == "mine" and [p.id for p in ps.prompts] == ["p000001", "b"]
    assert ps.prompts[0].answer_ids and ps.prompts[0].partner == "b"
    for text, msg in (('{"prompt": "x"}', ":1: needs string fields 'prompt' and 'answer'"),
                      ("not json", r"bad.jsonl:1: not valid JSON"),
                      ('{"prompt": "x", "answer": " "}', "must not be empty")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text + "\n")
        with pytest.raises(InputError, match=msg):
            build_set(str(bad), build_tokenizer(), CorpusSpec(), 10)
    with pytest.raises(InputError, match="no such file"):
        build_set(str(tmp_path / "missing.jsonl"), build_tokenizer(), CorpusSpec(), 10)


def test_resume_cache_belongs_to_its_model():
    """The cached tail stages are keyed by the model object: a model built where a freed one lived
    (same id) never gets the old model's layers."""
    import gc
    import weakref

    from saeray.sweeps import splice

    outs = []
    for seed in (1, 2, 3):
        stage, sae, ids, keep = _setup("llama")
        with torch.no_grad():
            for p in stage.parameters():
                p.add_(0.01 * seed)
        c = clean_pass(stage, sae, "resid_post.0", ids, keep)
        rows = decode(sae, c.f)[None]
        fast = last_logits(stage, "resid_post.0", c.ids[None], c.keep, rows, c.hidden)
        torch.testing.assert_close(fast, last_logits(stage, "resid_post.0", c.ids[None], c.keep, rows), atol=1e-5, rtol=1e-5)
        assert stage in splice._TAILS
        ref = weakref.ref(stage)
        del stage, c
        gc.collect()
        assert ref() is None          # the cache does not keep a model alive

"""Building blocks of the context look-up sweep (issue 15), checked against direct computations:
congruence of next-token neurons, upstream head scores, the prompt-trimming rule, the KS test
against exhaustive enumeration and balanced accuracy with unparseable answers."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from saeray.models.random_init import random_model
from saeray.models.shard import split
from saeray.sweeps.heads import active, head_scores, input_direction, pairs
from saeray.sweeps.neurons import congruence, is_whole_word, next_token_neurons, random_neurons
from saeray.sweeps.stats import _p_asymptotic, _p_exact, balanced_accuracy, ks_2samp, ks_statistic
from saeray.sweeps.trim import trim


def _model(family: str):
    m = random_model(family, n_layers=3, d_model=32, n_heads=4, vocab_size=64, seed=4)
    with torch.no_grad():     # norms with non-trivial scales, so folding them in is tested
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight") or "ln" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return m


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
def test_congruence_equals_a_direct_computation(family):
    m = _model(family)
    sd = dict(m.named_parameters())
    if family == "gpt_neox":
        W_out, gamma, W_U = sd["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"].T, sd["gpt_neox.final_layer_norm.weight"], m.get_output_embeddings().weight.T
    elif family == "gpt2":
        W_out, gamma, W_U = sd["transformer.h.1.mlp.c_proj.weight"], sd["transformer.ln_f.weight"], m.lm_head.weight.T
    else:
        W_out, gamma, W_U = sd["model.layers.1.mlp.down_proj.weight"].T, sd["model.norm.weight"], m.lm_head.weight.T
    if family != "llama":
        W_out = W_out - W_out.mean(1, keepdim=True)
    U = gamma[:, None] * W_U
    U = U - U.mean(1, keepdim=True)
    torch.testing.assert_close(congruence(m, 1), (W_out @ U).detach(), rtol=1e-5, atol=1e-5)


def test_next_token_neurons_rank_and_filter():
    m = _model("gpt_neox")
    c = congruence(m, 2)
    words = {t: (f" w{chr(97 + t % 26)}{chr(97 + t // 26)}" if t % 3 else f"{t}") for t in range(64)}  # every third: no word
    got = next_token_neurons(m, [2], lambda t: words[t], n_per_layer=5)
    assert len(got) == 5 and all(n.layer == 2 and is_whole_word(n.token) for n in got)
    assert [n.congruence for n in got] == sorted([n.congruence for n in got], reverse=True)
    best = c.max(1).values
    for n in got:
        assert n.token_id == int(c[n.index].argmax()) and n.congruence == pytest.approx(float(best[n.index]))
    # nothing with a word token ranks above a kept neuron and was skipped
    order = torch.argsort(best, descending=True).tolist()
    first_words = [i for i in order if int(c[i].argmax()) % 3][:5]
    assert [n.index for n in got] == first_words
    assert len(random_neurons(m, [1, 2], lambda t: words[t], n_per_layer=4, seed=1)) == 8
    assert is_whole_word("quito", word_level=True) and not is_whole_word("is", word_level=True)
    assert not is_whole_word(" a") and not is_whole_word("Paris") and is_whole_word(" Paris")


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_head_scores_add_up_to_the_attention_output(family):
    m = _model(family)
    (stage,) = split(m, [])
    ids = [1, 5, 9, 3, 17, 22, 8]
    L, i = 2, 7
    s = head_scores(stage, ids, L, i)
    assert s.shape == (2, 4)
    w = input_direction(stage, L, i)
    out = stage(torch.tensor([ids]), capture=["attn_out.0", "attn_out.1"], logits=False)
    from saeray.models.arch import view

    arch = view(stage)
    for l in range(L):
        b = arch.b_O(l)
        direct = out.acts[f"attn_out.{l}"][0, -1].float() @ w - (float(b.float() @ w) if b is not None else 0.0)
        assert float(s[l].sum()) == pytest.approx(float(direct), rel=1e-4, abs=1e-5)
    # the direction: the gate column for a gated MLP, the input column otherwise, norm scale folded in
    col = arch.W_gate(L)[:, i] if family == "llama" else arch.W_in(L)[:, i]
    torch.testing.assert_close(w, (col * arch.ln_mlp(L).weight).detach().float())


def test_active_heads_and_pairs():
    sc = torch.zeros(2, 4)
    sc[1, 2] = 10.0
    a = active(sc)
    assert a.sum() == 1 and a[1, 2]
    per = [a, torch.zeros_like(a), a, torch.zeros_like(a)]          # active on half the prompts
    assert pairs(per) == [(1, 2, 0.5)]
    assert pairs([a] * 4) == []                                       # always active: nothing to contrast


def test_trimming_keeps_the_shortest_suffix_above_the_threshold():
    # the activation at the last token is the sum of the weights of the tokens still in the prompt
    weights = {0: 0.0, 1: 5.0, 2: 1.0, 3: 1.0, 4: 0.5, 5: 2.5}
    act = lambda ids: sum(weights[t] for t in ids)          # noqa: E731
    ids = [1, 2, 3, 4, 5]             # full 10.0, threshold 8: [2, 3, 4, 5] = 5.0 fails, so all of it
    assert trim(ids, act) == [1, 2, 3, 4, 5]
    weights[1] = 0.5                  # full 5.5; threshold 4.4: [3,4,5] = 4.0 fails, [2,3,4,5] = 5.0 keeps
    assert trim(ids, act) == [2, 3, 4, 5]
    assert trim(ids, act, keep=0.4) == [5]         # threshold 2.2: the last token alone (2.5) keeps it
    calls = []
    trim([7, 8], lambda x: (calls.append(list(x)), 1.0)[1], prefix=[0])
    assert all(c[0] == 0 for c in calls)           # BOS put back in front of every candidate


def test_ks_against_exhaustive_enumeration():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=4), rng.normal(0.8, 1, size=5)
    pooled = np.concatenate([a, b])
    # D by brute force over every threshold
    d_brute = max(abs((a <= x).mean() - (b <= x).mean()) for x in pooled)
    assert ks_statistic(a, b) == pytest.approx(d_brute)
    # p: the share of all C(9, 4) splits of the pooled values whose D is at least the observed one
    ds = []
    for idx in itertools.combinations(range(9), 4):
        mask = np.zeros(9, bool)
        mask[list(idx)] = True
        ds.append(ks_statistic(pooled[mask], pooled[~mask]))
    p_brute = np.mean(np.array(ds) >= d_brute - 1e-12)
    r = ks_2samp(a, b)
    assert r.d == pytest.approx(d_brute) and r.p == pytest.approx(p_brute)
    # the asymptotic form agrees with the exact one on larger samples
    for n, m, d in ((60, 80, 0.2), (90, 90, 0.15)):
        assert _p_asymptotic(n, m, d) == pytest.approx(_p_exact(n, m, d), abs=0.02)
    assert ks_2samp(rng.normal(size=400), rng.normal(0.5, 1, size=400)).p < 1e-6
    assert math.isnan(ks_2samp([], [1.0]).d)


def test_balanced_accuracy_counts_unparsed_answers_as_wrong():
    truth = [True, True, True, False, False, False, False]
    answers = [True, None, False, False, True, None, False]
    r = balanced_accuracy(truth, answers)
    assert (r.tp, r.fn, r.tn, r.fp, r.unparsed) == (1, 2, 2, 2, 2)
    assert r.score == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert math.isnan(balanced_accuracy([True, True], [True, False]).score)


def test_induction_score_reads_the_induction_position(monkeypatch):
    from saeray.sweeps import induction

    m = random_model("llama", n_layers=2, d_model=32, n_heads=4, vocab_size=64, seed=5)
    with torch.no_grad():      # layer 0: no queries or keys, so every head attends uniformly (causally)
        m.model.layers[0].self_attn.q_proj.weight.zero_()
        m.model.layers[0].self_attn.k_proj.weight.zero_()
    (stage,) = split(m, [])
    N = 6
    s = induction.induction_scores(stage, seq_len=N, batch=3, bos=0)
    assert s.shape == (2, 4)
    q = np.arange(1 + N, 1 + 2 * N - 1)              # second copy after BOS; key q - N + 1
    assert s[0].tolist() == pytest.approx([float(np.mean(1.0 / (q + 1)))] * 4, rel=1e-5)
    # a perfect induction head (attention exactly on the token after the earlier occurrence) scores 1
    T = 1 + 2 * N

    def fake(model, ids):
        w = torch.zeros(ids.shape[0], 4, T, T)
        w[:, :, :, 0] = 1.0
        for qq in range(1 + N, T):
            w[:, 2, qq] = 0.0
            w[:, 2, qq, qq - N + 1] = 1.0
        return {0: w}

    monkeypatch.setattr(induction, "attention_patterns", fake)
    s = induction.induction_scores(stage, seq_len=N, batch=2, bos=0)
    assert s[0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_head_ablation_equals_removing_the_head_from_the_weights():
    import copy

    from saeray.sweeps.heads import ablation_effects

    m = _model("llama")
    (stage,) = split(m, [])
    ids, tok = [1, 5, 9, 3, 17, 22, 8], 11
    got = ablation_effects(stage, ids, tok, [(0, 1), (1, 3)])
    with torch.no_grad():
        base = float(torch.softmax(m(torch.tensor([ids])).logits[0, -1], -1)[tok])
        for (l, h), e in zip([(0, 1), (1, 3)], got):
            m2 = copy.deepcopy(m)
            o = m2.model.layers[l].self_attn.o_proj.weight          # [d_model, heads·d_head]
            o[:, h * 8:(h + 1) * 8] = 0.0                           # d_head = 32 / 4
            p = float(torch.softmax(m2(torch.tensor([ids])).logits[0, -1], -1)[tok])
            assert e == pytest.approx(base - p, abs=1e-6)


def test_top_activating_contexts_equal_brute_force():
    from saeray.sweeps.activating import top_activating

    m = _model("gpt_neox")
    (stage,) = split(m, [])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (11, 9), generator=g).numpy()
    keep = np.ones_like(ids, dtype=bool)
    keep[:, 0] = False
    keep[3] = False                                   # a context with nothing kept never counts
    neurons = [(1, 4), (2, 0), (2, 100)]
    got = top_activating(stage, ids, keep, neurons, top=4, batch=3)
    acts = stage(torch.from_numpy(ids), capture=["mlp_post.1", "mlp_post.2"], logits=False).acts
    for l, i in neurons:
        v = acts[f"mlp_post.{l}"][..., i].masked_fill(~torch.from_numpy(keep), float("-inf"))
        rows = [r for r in range(11) if keep[r].any()]
        want = sorted(rows, key=lambda r: (-float(v[r].max()), r))[:4]
        assert [h.context for h in got[(l, i)]] == want
        for h in got[(l, i)]:
            assert h.value == pytest.approx(float(v[h.context].max())) and v[h.context, h.position] == v[h.context].max()


def test_explainer_and_classifier_prompts_and_answers():
    from saeray.interp.explain import classify_messages, explain_messages, parse_yes_no

    m = explain_messages("quito", ["mia lives in quito", "( a b"], ["the cat is"])
    text = m[0]["content"]
    assert m[0]["role"] == "user" and '"quito"' in text
    assert text.index('- """mia lives in quito"""') < text.index("Inactive examples") < text.index('- """the cat is"""')
    c = classify_messages("Active when\na city\nfollows.", "noah lives in")[0]["content"]
    assert c.startswith("Active when a city follows.\nIs the given example an active example? (Yes/No)\n")
    assert c.endswith('"""noah lives in"""\nAnswer: ')
    for ans, want in ((" Yes", True), ("no.", False), ("YES, it is", True), ("Nope", None), ("", None),
                      ("I think yes", None)):
        assert parse_yes_no(ans) is want, ans


@pytest.mark.slow
def test_explain_and_score_against_a_real_server(llm_server):
    """SmolLM2 on `transformers serve` writes an explanation and answers the classifier; every
    answer is counted, parsed or not."""
    from saeray.interp.client import LLMClient, LLMConfig
    from saeray.interp.explain import (CLASSIFY_TOKENS, EXPLAIN_TOKENS, LLMExplainer, classify_messages,
                                       explain_messages, parse_yes_no)

    base_url, model_id = llm_server
    active = ["mia lives in quito", "noah lives in lima"]
    inactive = ["the cat eats fish", "( red blue green"]
    with LLMClient(LLMConfig(base_url=base_url, model=model_id, timeout_s=180)) as client:
        ex = LLMExplainer(client)
        explanation = ex.generate(explain_messages("quito", active, inactive), EXPLAIN_TOKENS)
        assert len(explanation.split()) >= 3
        held = ["ava lives in oslo", "the dog runs fast"]
        answers = [parse_yes_no(ex.generate(classify_messages(explanation, e), CLASSIFY_TOKENS)) for e in held]
    r = balanced_accuracy([True, False], answers)
    assert r.tp + r.fn + r.tn + r.fp == 2 and r.unparsed == sum(a is None for a in answers)


def test_rule_explainer_writes_the_separating_rule_and_classifies_by_it():
    from saeray.interp.explain import classify_messages, explain_messages, parse_yes_no
    from saeray.interp.rules import RuleExplainer, features

    ex = RuleExplainer()
    # active: the predicted word is inside a quotation; inactive: it is not (other features mixed)
    active = ['mia says " the cow is brown', 'noah says " ava eats bread', 'at the barn . liam says " the dog is red']
    inactive = ['the cow is brown', 'ava eats bread . the cat is red', 'liam says " hi " . the dog is red']
    explanation = ex.generate(explain_messages("red", active, inactive), 200)
    assert explanation.endswith("(rule: quote)") and "inside a quotation" in explanation
    for example, want in (('ivy says " the cup is blue', True), ('the cup is blue', False),
                          ('a says " b " . c says " d', True), ('a says " b " . the e', False)):
        assert parse_yes_no(ex.generate(classify_messages(explanation, example), 3)) is want, example
    # the copy rule: the predicted word occurs earlier; negations are written as "unless"
    assert features("code zib tok . mia . code zib")["copy"] and not features("code zib tok")["copy"]
    expl = ex.generate(explain_messages("zib", ["a b c", "d e f"], ["code zib x . code zib", "q zib r zib"]), 200)
    assert expl.endswith("(rule: not copy)") and " unless " in expl
    # an explanation without a rule (an LLM's) gets no yes/no: counted as unparsed, never dropped
    assert parse_yes_no(ex.generate(classify_messages("Active on city names.", "mia lives in quito"), 3)) is None


def test_a_lookup_item_on_a_tiny_model_equals_its_parts():
    """Prompts end at the neuron's maximal token and keep ≥ 0.8 of its activation; head scores,
    active heads, pairs and ablation effects equal the building blocks called directly."""
    from saeray.sweeps.heads import ablation_effects
    from saeray.sweeps.lookups import ItemOptions, activation_at_last, run_item, select

    m = _model("gpt_neox")
    (stage,) = split(m, [])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (40, 12), generator=g).numpy()
    ids[:, 0] = 1                                                     # BOS
    keep = np.ones_like(ids, dtype=bool)
    keep[:, 0] = False
    words = {t: f" w{chr(97 + t % 26)}{chr(97 + t // 26)}" for t in range(64)}
    neurons = select(stage, 2, "top", 3, lambda t: words[t], word_level=False)
    assert [n["set"] for n in neurons] == ["top"] * 3
    # 8 earlier heads: mean + 2σ is rarely crossed by one of 8 values, so 1σ here; every head active
    # somewhere is a pair
    opt = ItemOptions(n_prompts=8, n_test=4, sigmas=1.0, pair_lo=1e-6, pair_hi=1.0)
    res = run_item(stage, 2, neurons, (ids[:30], keep[:30]), (ids[30:], keep[30:]), 1, opt)
    assert len(res) == 3 and any(r["pairs"] for r in res)
    for r in res:
        act = activation_at_last(stage, 2, r["index"])
        ex = [p for p in r["prompts"] if p["split"] == "explain"]
        assert 0 < len(ex) <= 8 and 0 < len(r["prompts"]) - len(ex) <= 4
        for p in r["prompts"]:
            src = ids[:30] if p["split"] == "explain" else ids[30:]
            assert p["ids"][0] == 1 and p["ids"][1:] == src[p["context"], 1 + p["start"]: p["position"] + 1].tolist()
            assert p["trimmed_activation"] == pytest.approx(act(p["ids"]), abs=1e-5)
            if p["activation"] > 0:
                assert p["trimmed_activation"] >= 0.8 * p["activation"] - 1e-5
            s = head_scores(stage, p["ids"], 2, r["index"])
            assert p["head_scores"] == pytest.approx(s.flatten().tolist(), abs=1e-5)
            assert p["active"] == active(s, 1.0).flatten().tolist()
            assert p["effects"] == pytest.approx(ablation_effects(stage, p["ids"], r["token_id"],
                                                                  [(q["head_layer"], q["head"]) for q in r["pairs"]]),
                                                 abs=1e-5)
        share = torch.tensor([p["active"] for p in ex]).float().mean(0)
        assert [(q["head_layer"], q["head"]) for q in r["pairs"]] == \
            [divmod(i, 4) for i in torch.nonzero(share > 0).flatten().tolist()]
        mean = torch.tensor([p["head_scores"] for p in ex]).mean(0)
        assert r["top_head"] == divmod(int(mean.argmax()), 4)
    # a pair budget keeps, per neuron, the pair whose head has the largest mean attribution
    from dataclasses import replace as _replace

    capped = run_item(stage, 2, neurons, (ids[:30], keep[:30]), (ids[30:], keep[30:]), 1, _replace(opt, max_pairs=1))
    for r, c in zip(res, capped):
        if not r["pairs"]:
            assert c["pairs"] == []
            continue
        mean = torch.tensor([p["head_scores"] for p in r["prompts"] if p["split"] == "explain"]).mean(0)
        best = max(r["pairs"], key=lambda q: float(mean[q["head_layer"] * 4 + q["head"]]))
        assert c["pairs"] == [best] and all(len(p["effects"]) == 1 for p in c["prompts"])


def _rows(texts_active: list[str], texts_inactive: list[str], test: list[tuple[str, bool]]):
    """activating rows of one neuron (layer 2, 4 heads per layer) where head L1H2 (flat 6) is active
    on the given prompts, and its pair."""
    rows = []
    for split, items in (("explain", [(t, True) for t in texts_active] + [(t, False) for t in texts_inactive]),
                         ("test", test)):
        for rank, (text, on) in enumerate(items):
            rows.append({"target": "t", "set": "top", "layer": 2, "neuron": 5, "split": split, "rank": rank,
                         "text": text, "tokens": ["<bos>"] + text.split(), "trimmed_activation": 1.0,
                         "active_heads": [6] if on else [1], "head_scores": [0.0] * 8})
    pair = {"target": "t", "set": "top", "layer": 2, "neuron": 5, "token": "red", "head_layer": 1, "head": 2, "share": 0.5}
    return rows, pair


def test_explaining_step_scores_held_out_prompts_and_skips_one_sided_pairs():
    from saeray.interp.rules import RuleExplainer
    from saeray.sweeps.lookup_explain import explain_item

    act, ina = ['mia says " the cow is red', 'liam says " a red'], ['the cow is red', 'ava sees a red']
    test = [('ivy says " the cup is red', True), ('the cup is red', False), ('the hat is red', True),
            ('noah says " so red', False)]
    rows, pair = _rows(act, ina, test)
    out, cls = explain_item(rows, [pair], RuleExplainer(), "offline-rules")
    (r,) = out
    assert r["explanation"].endswith("(rule: quote)") and r["skipped"] == ""
    # truth [T, F, T, F]; the rule answers [yes, no, no, yes]: TPR 1/2, TNR 1/2
    assert (r["tp"], r["fn"], r["tn"], r["fp"], r["unparsed"]) == (1, 1, 1, 1, 0) and r["score"] == 0.5
    assert [c["truth"] for c in cls] == [True, False, True, False]
    assert [c["prediction"] for c in cls] == [True, False, False, True]
    rows, pair = _rows(act, ina, [(t, True) for t, _ in test])
    out, cls = explain_item(rows, [pair], RuleExplainer(), "offline-rules")
    assert out[0]["skipped"] == "held-out prompts all active" and math.isnan(out[0]["score"]) and cls == []


def test_delphi_layout_names_a_pair_like_a_latent():
    import json as _json

    from saeray.sweeps.lookup_tables import delphi_files

    row = {"set": "top", "layer": 3, "neuron": 17, "head_layer": 1, "head": 2, "explanation": 'When "quoted".'}
    c = {"set": "top", "layer": 3, "neuron": 17, "head_layer": 1, "head": 2, "rank": 0, "truth": True,
         "prediction": None, "tokens": ["a", "b"], "activations": [0.0, 2.0]}
    files = delphi_files([row], [c])
    assert _json.loads(files["explanations/mlp_post.3.head1.2_latent17.txt"]) == 'When "quoted".'
    (s,) = _json.loads(files["scores/detection/mlp_post.3.head1.2_latent17.txt"])
    assert s["activating"] is True and s["prediction"] is None and s["correct"] is None and s["str_tokens"] == ["a", "b"]
    # delphi reads the module and the latent index back by splitting on "_latent"
    name = "mlp_post.3.head1.2_latent17"
    assert name.rsplit("_latent", 1) == ["mlp_post.3.head1.2", "17"]


def test_a_sweep_recorded_before_an_option_existed_still_resumes(tmp_path):
    """An option added later defaults to the old behaviour: a record without it is read with the
    default; a real change is still refused, naming the field."""
    from saeray.errors import InputError
    from saeray.spec import StoreSpec, SweepSpec
    from saeray.store import Store
    from saeray.sweeps.stage import guard, identity

    store = Store.from_spec(StoreSpec(url=str(tmp_path)))
    sw = SweepSpec(name="l", method="lookups")
    old = identity(sw)
    del old["lookups"]["max_pairs_per_neuron"]
    store.write_json("sweeps/l/sweep.json", old)
    guard(store, sw)
    with pytest.raises(InputError, match=r"sweeps\.lookups changed"):
        guard(store, SweepSpec(name="l", method="lookups", lookups={"max_pairs_per_neuron": 2}))

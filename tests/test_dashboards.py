"""Feature dashboards without Ray: which latents are shown and why, the contexts chosen per latent
(top per document, interval samples with their shares, windows that stay in their document), the
density and histogram, the logit lens and the nearest latents, all checked against a direct
computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saeray.dashboards.features import Tokens, batch_features, contexts, encode, histogram, logit_lens
from saeray.dashboards.select import select
from saeray.spec import DashboardsSpec


def _tokens(n_docs=6, length=10, d=8, seed=0):
    rng = np.random.default_rng(seed)
    doc = np.repeat(np.arange(n_docs), length).astype(np.int64)
    pos = np.tile(np.arange(1, length + 1), n_docs).astype(np.int32)
    token = rng.integers(0, 20, n_docs * length).astype(np.int32)
    return Tokens(rng.standard_normal((n_docs * length, d)).astype(np.float32), doc, pos, token)


VOCAB = [f" w{i}" for i in range(20)]


def test_select_shows_every_latent_of_a_narrow_sae_and_labelled_groups_of_a_wide_one():
    opts = DashboardsSpec(all_up_to=8, frequent=2, influential=2, random=2, seed=1)
    counts = np.array([0, 5, 9, 1, 0, 7, 3, 2, 0, 4])
    assert select(counts[:8], opts) == {i: ["all"] for i in range(8)}
    g = select(counts, opts, influence={3: 0.5, 6: 0.9, 0: 0.0}, concept_latents=[8])
    assert g[8] == ["concept"]                              # a concept's latent, even if it never fired here
    assert [i for i, v in g.items() if "frequent" in v] == [2, 5]
    assert [i for i, v in g.items() if "influential" in v] == [3, 6]     # zero influence is not influential
    rand = [i for i, v in g.items() if v == ["random"]]
    assert len(rand) == 2 and all(counts[i] > 0 and i not in (2, 5, 3, 6) for i in rand)
    assert select(counts, opts, {3: 0.5, 6: 0.9}, [8]) == g          # seeded: the same page every time


def test_contexts_top_per_document_intervals_and_windows():
    t = _tokens(n_docs=6, length=10)
    # latent values on a few rows: doc 0 twice (its best must be kept once), docs 1..5 once each
    rows = np.array([2, 5, 13, 27, 31, 44, 58])
    vals = np.array([0.9, 1.0, 0.2, 0.5, 0.45, 0.1, 0.3], dtype=np.float32)
    out = contexts(t, rows, vals, VOCAB, top=3, quantiles=2, per_quantile=5, before=3, after=2,
                   rng=np.random.default_rng(0))
    top = [c for c in out if c["bin_contains"] == -1]
    assert [c["doc"] for c in top] == [0, 2, 3] and [max(c["values"]) for c in top] == [1.0, 0.5, 0.45]
    first = top[0]
    assert first["tokens"][first["qualifying_token_index"]] == VOCAB[t.token[5]]
    assert first["values"] == [pytest.approx(0.9), 0.0, 0.0, 1.0, 0.0, 0.0]       # rows 2..7 of doc 0
    # the intervals (0, 0.5] and (0.5, 1.0], highest first; docs already shown are not repeated
    low = [c for c in out if c["bin_contains"] != -1]
    assert {c["doc"] for c in low} == {1, 4, 5}
    assert all(c["bin_max"] == 0.5 and c["bin_contains"] == pytest.approx(5 / 7, abs=1e-5) for c in low)
    # a window never crosses into the next document
    end = contexts(t, np.array([9]), np.array([1.0], np.float32), VOCAB, top=1, quantiles=0, per_quantile=1,
                   before=2, after=4, rng=np.random.default_rng(0))[0]
    assert end["doc"] == 0 and len(end["tokens"]) == 3 and end["qualifying_token_index"] == 2


def test_histogram_and_logit_lens_against_direct_computation():
    v = np.array([0.1, 0.2, 0.2, 0.9])
    centres, heights = histogram(v, bins=4)
    assert sum(heights) == 4 and heights[0] == 3 and centres[0] == pytest.approx(0.1 + 0.8 / 8)
    W_U = torch.randn(8, 20)
    d = torch.randn(8)
    lens = logit_lens(d, W_U, VOCAB, rows=3)
    logits = (d @ W_U).numpy()
    assert lens["pos_str"] == [VOCAB[i] for i in np.argsort(-logits)[:3]]
    assert lens["neg_str"] == [VOCAB[i] for i in np.argsort(logits)[:3]]
    assert lens["neg_values"][0] == pytest.approx(float(logits.min()), abs=1e-4)
    assert logit_lens(d, torch.randn(16, 20), VOCAB, 3)["pos_str"] == []    # another width: no lens


def test_batch_features_density_neighbours_and_fields():
    from saeray.sae.registry import build

    torch.manual_seed(0)
    t = _tokens(n_docs=20, length=12, d=8)
    sae = build("topk", d_in=8, width=16, k=3)
    opts = DashboardsSpec(top=4, quantiles=2, per_quantile=2, before=2, after=1, neighbours=3)
    feats = batch_features(sae, t, [0, 5, 9], VOCAB, torch.randn(8, 20), opts, {5: {"groups": ["frequent"]}},
                           n_contexts=20, context_len=12, dataset="test")
    f = {x["feature_index"]: x for x in feats}
    with torch.no_grad():
        lat = sae.encode(torch.tensor(t.acts))
    for i in (0, 5, 9):
        fired = int((lat[:, i].abs() > 1e-6).sum())
        assert f[i]["saeray"]["n_fired"] == fired and f[i]["frac_nonzero"] == pytest.approx(fired / len(t))
        assert sum(f[i]["freq_hist_data_bar_heights"]) == fired
        dirs = sae.directions()
        cos = (dirs[i] @ dirs.T)
        cos[i] = -2
        assert f[i]["saeray"]["neighbours"] == torch.topk(cos, 3).indices.tolist()
        for a in f[i]["activations"]:
            r = np.nonzero((t.doc == a["doc"]) & (t.pos == a["pos"]))[0][0]
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(float(lat[r, i]), abs=1e-4)
    assert f[5]["saeray"]["groups"] == ["frequent"]
    want = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
            "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero", "freq_hist_data_bar_values",
            "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
            "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}
    assert want <= set(f[0])
    r, c, v = encode(sae, t.acts, np.array([5]))
    assert set(c.tolist()) <= {0} and np.allclose(v, lat[r, 5].numpy())


def test_planted_labels_explain_a_latent_that_fires_on_one_label():
    from saeray.dashboards.explain import explain, planted_labels
    from saeray.storyworld.generator import generate_doc

    doc = np.concatenate([np.full(len(generate_doc(d).tokens), d) for d in range(6)]).astype(np.int64)
    pos = np.concatenate([np.arange(len(generate_doc(d).tokens)) for d in range(6)]).astype(np.int32)
    keep = pos > 0                                    # the harvest drops BOS
    names, Y = planted_labels(doc[keep], pos[keep], seed=0)
    assert Y.shape[0] == int(keep.sum()) and "category=animal" in names
    animal = np.nonzero(Y[:, names.index("category=animal")])[0]
    e = explain(animal, names, Y)
    assert e["label"] == {"concept": "category=animal", "f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert "category=animal" in e["explanation"]
    # firing on a random half of all tokens: no label holds most of its firings
    rng = np.random.default_rng(0)
    e = explain(np.sort(rng.choice(len(Y), len(Y) // 2, replace=False)), names, Y)
    assert e["explanation"].startswith("no planted label")

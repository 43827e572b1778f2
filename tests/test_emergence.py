"""Emergence without a cluster: presence with the step-0 control, time and scale thresholds and
re-activations on hand-built score tables; matching recovers a known permutation; lineages count
births and deaths; the probes' AUROC, thresholds and k-sparse read-out; spec checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeray.emergence import matching, thresholds as th
from saeray.emergence.behaviour import behaviour_steps
from saeray.errors import InputError
from saeray.evaluate import probes
from saeray.evaluate.concepts import auroc as auroc_ref

STEPS = [0, 1, 2, 4, 8]


def table(values: dict[str, dict[tuple[int, int], float]], size: int = 0) -> dict:
    """{concept: {(step, layer): score}} -> the analysis' {(size, step, layer, concept): score}."""
    return {(size, s, l, c): v for c, d in values.items() for (s, l), v in d.items()}


def flat(per_step: list[float], layers: int = 1) -> dict[tuple[int, int], float]:
    return {(s, l): v for s, v in zip(STEPS, per_step) for l in range(layers)}


def test_time_threshold_control_and_a_concept_that_never_emerges():
    scores = table({
        "emerges": flat([0.55, 0.6, 0.93, 0.95, 0.97]),          # present from step 2 on
        "flickers": flat([0.5, 0.92, 0.7, 0.95, 0.96]),          # present at 1, lost at 2: stays from 4
        "never": flat([0.5, 0.6, 0.7, 0.8, 0.85]),                # below the threshold throughout
        "lost": flat([0.5, 0.95, 0.95, 0.95, 0.6]),               # present, then gone at the last step
        "token": flat([0.97, 0.97, 0.98, 0.98, 0.99]),            # a random network reads it already
    })
    present = th.presence(scores, threshold=0.9, margin=0.05)
    steps = th.emergence_steps(present)
    assert steps[("emerges", 0)] == 2
    assert steps[("flickers", 0)] == 4
    assert steps[("never", 0)] is None
    assert steps[("lost", 0)] is None
    # the step-0 control: 0.99 passes the threshold but is within the margin of step 0's 0.97
    assert steps[("token", 0)] is None
    assert not any(p for (z, s, l, c), p in present.items() if c == "token")
    # without a margin, 0.97 >= step 0's 0.97 and the random network's reading would count from step 1
    assert th.emergence_steps(th.presence(scores, threshold=0.9, margin=0.0))[("token", 0)] == 1
    # step 0 itself is never "present": it is the control
    assert not any(p for (z, s, l, c), p in present.items() if s == 0)


def test_presence_needs_the_step0_control():
    with pytest.raises(ValueError, match="step-0"):
        th.presence({(0, 4, 0, "c"): 0.95}, 0.9, 0.05)


def test_scale_threshold_is_the_smallest_present_size():
    scores = {}
    for z, per in enumerate([[0.5, 0.6, 0.7, 0.8, 0.8],      # small: never
                             [0.5, 0.6, 0.7, 0.95, 0.95],    # middle: from step 4
                             [0.5, 0.6, 0.92, 0.95, 0.96]]): # large: from step 2
        scores.update(table({"c": flat(per)}, size=z))
    present = th.presence(scores, 0.9, 0.05)
    scale = th.scale_thresholds(present)
    assert scale[("c", 2)] == 2 and scale[("c", 4)] == 1 and scale[("c", 8)] == 1 and scale[("c", 1)] is None
    steps = th.emergence_steps(present)
    assert [steps[("c", z)] for z in range(3)] == [None, 4, 2]


def test_reactivation_across_layers():
    # at step 8: present at layers 0 and 1, gone at 2 and 3, back at 4; absent at 5; never at step 4
    prof = [0.95, 0.93, 0.7, 0.6, 0.94, 0.8]
    scores = {(0, 0, l, "c"): 0.5 for l in range(6)}
    scores.update({(0, 8, l, "c"): v for l, v in enumerate(prof)})
    scores.update({(0, 4, l, "c"): 0.6 for l in range(6)})
    present = th.presence(scores, 0.9, 0.05)
    r = th.reactivations(present)
    assert len(r) == 1
    assert (r[0].concept, r[0].step, r[0].first, r[0].absent, r[0].again) == ("c", 8, 1, (2, 3), 4)
    # a concept present only early (a fade without return) is no re-activation
    scores2 = {(0, 0, l, "d"): 0.5 for l in range(4)}
    scores2.update({(0, 8, l, "d"): v for l, v in enumerate([0.95, 0.95, 0.6, 0.6])})
    assert th.reactivations(th.presence(scores2, 0.9, 0.05)) == []
    assert th.layer_profile(scores, "c", 0, 8) == list(enumerate(prof))


def test_step_of_orders_revisions():
    assert th.step_of("step512") == 512 and th.step_of("main", 1024) == 1024 and th.step_of("v1") is None
    assert th.stays_from([0, 1, 2], [False, False, False]) is None
    assert th.stays_from([4, 0, 2], [True, False, True]) == 2   # order of the input does not matter


def test_matching_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 32))
    perm = rng.permutation(128)
    moved = w[perm] * rng.uniform(0.5, 2.0, size=(128, 1)) + 0.02 * rng.normal(size=(128, 32))
    c = matching.cosines(w, moved)
    succ = matching.successors(c, 0.9)
    # feature i of the first dictionary is row j of the second where perm[j] == i
    inv = np.argsort(perm)
    assert succ == {i: int(inv[i]) for i in range(128)}
    s = matching.summary(c, 0.9)
    assert s["matched_one_to_one"] == 1.0 and s["one_to_one_mean"] > 0.99
    # against an unrelated dictionary, almost nothing matches
    other = matching.summary(matching.cosines(w, rng.normal(size=(128, 32))), 0.9)
    assert other["matched_one_to_one"] < 0.05 and other["one_to_one_mean"] < 0.6


def test_lineages_birth_drift_and_death():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(16, 64))
    b = a.copy()
    b[3] = rng.normal(size=64)                   # feature 3 dies after t=0; a new one is born at t=1
    b[5] = a[5] + 0.3 * rng.normal(size=64)      # feature 5 drifts a little
    c = b[rng.permutation(16)]                   # indices reshuffled: identity comes from the match
    lins = matching.lineages([a, b, c], thr=0.7)
    counts = matching.lineage_counts(lins, 3)
    assert counts == [{"alive": 16, "born": 0, "died": 1}, {"alive": 16, "born": 1, "died": 0},
                      {"alive": 16, "born": 0, "died": 0}]
    full = [l for l in lins if l.born == 0 and l.last == 2]
    assert len(full) == 15
    drift5 = [l.drift for l in full if l.features[0] == (0, 5)][0]
    assert 0.7 < drift5 < 0.999 and min(l.drift for l in full if l.features[0] != (0, 5)) > 0.999
    born = matching.lineage_of(lins, 1, 3)
    assert born is not None and born.born == 1 and born.last == 2


def test_ranks_and_auroc_match_the_reference_with_ties():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(size=(500, 6)), 0).round(1)   # many exact ties, like SAE latents
    y = rng.random((500, 3)) < 0.2
    y[:, 2] |= x[:, 4] > 0.5
    a = probes.auroc_matrix(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for c in range(3):
        for j in range(6):
            assert a[c, j] == pytest.approx(auroc_ref(x[:, j], y[:, c]), abs=1e-12)
    assert a[2].argmax() == 4


def test_best_threshold_maximises_f1():
    s = torch.tensor([[0.9], [0.8], [0.8], [0.3], [0.1]], dtype=torch.float64)
    y = torch.tensor([[1], [1], [0], [0], [0]], dtype=torch.bool)
    thr = probes.best_thresholds(s, y)
    # cutting at 0.9 gives F1 2/3; at 0.8 (both tied 0.8s in) 0.8; lower is worse
    assert thr.item() == 0.8
    assert probes.f1_at(s, y, thr).item() == pytest.approx(0.8)


def _split_concept(n: int = 6000, seed: int = 3):
    """A concept spread over four latents (one per member: 'animal' learned as one latent per
    animal) plus noise latents, and its labels."""
    g = torch.Generator().manual_seed(seed)
    member = torch.randint(0, 16, (n,), generator=g)          # 0..3: in the concept, 4..15: not
    lat = torch.rand(n, 32, generator=g) * (torch.rand(n, 32, generator=g) < 0.05)
    lat[torch.arange(n), member] += 1.0 + torch.rand(n, generator=g)
    y = (member < 4).unsqueeze(1)
    half = torch.arange(n) % 2 == 0
    return probes.Split(lat[half], y[half], lat[~half], y[~half])


def test_sparse_probe_finds_a_concept_spread_over_several_latents():
    s = _split_concept()
    one = probes.best_latent(s)
    k4 = probes.sparse_probe(s, 4)
    assert one["auroc"][0] < 0.75 and one["f1"][0] < 0.5
    assert k4["auroc"][0] > 0.98 and k4["f1"][0] > 0.9
    assert sorted(k4["latents"][0].tolist()) == [0, 1, 2, 3]
    k1 = probes.sparse_probe(s, 1)
    assert k1["auroc"][0] < k4["auroc"][0]


def test_linear_probe_reads_a_linear_concept():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 16, generator=g)
    y = (x @ torch.linspace(-1, 1, 16) > 0.5).unsqueeze(1)
    half = torch.arange(4000) % 2 == 0
    r = probes.linear_probe(probes.Split(x[half], y[half], x[~half], y[~half]))
    assert r["auroc"][0] > 0.99 and r["f1"][0] > 0.9


def test_behaviour_step_stays_above_the_threshold():
    curves = {"fact_recall": {0: 0.0, 64: 0.02, 128: 0.1, 256: 0.97, 512: 1.0},
              "copying": {0: 0.0, 64: 0.6, 128: 0.1, 256: 0.4, 512: 0.55}}
    assert behaviour_steps(curves, [0, 64, 128, 256, 512], 0.5) == {"fact_recall": 256, "copying": 512}


def _spec(**em) -> str:
    return json.dumps({"name": "e", "model": [{"name": "storyworld-tiny-1l", "revisions": ["step8", "step64"]}],
                       "hookpoints": ["resid_post.*"], "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}]},
                       "emergence": em})


def test_spec_checks():
    from saeray.emergence.presence import check
    from saeray.run.targets import expand_targets
    from saeray.spec import parse_spec

    spec = parse_spec(_spec())
    with pytest.raises(InputError, match=r"model.revisions: emergence needs step0"):
        check(spec, expand_targets(spec))
    with pytest.raises(InputError, match="presence_k"):
        parse_spec(_spec(measure="sparse", presence_k=3))
    with pytest.raises(InputError, match="emergence.sae"):
        s2 = parse_spec(_spec(sae="gba"))
        check(s2, expand_targets(s2))
    with pytest.raises(InputError, match="launcher"):
        parse_spec(json.dumps({**json.loads(_spec()), "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                                                             "train": {"launcher": "task", "workers": 2, "batch_size": 64}}}))


def test_warm_start_carries_directions_and_latents_into_new_data(tmp_path):
    """SAE-Track's warm start: a TopK SAE saved at one checkpoint starts the next one's training with
    the same latent directions at the same indices, even when the new activations have another scale
    (the new data's normalisation absorbs it), and a non-homogeneous architecture is refused."""
    from saeray.sae import io as sae_io
    from saeray.sae.synthetic import PlantedFeatures
    from saeray.sae.train import MultiTrainer, TrainConfig, Variant, fit
    from saeray.store import Store

    torch.set_num_threads(1)
    pf = PlantedFeatures(d=16, n=48, f_min=0.01, f_max=0.2, seed=3, spacing="random")
    cfg = TrainConfig(tokens=40 * 256, batch_size=256, lr=3e-3, warmup_steps=5, dead_window_tokens=2560,
                      checkpoint_every=0, log_every=50)
    v = Variant("topk", 64, k=4)
    sae, _ = fit(pf.batches(256, cfg.tokens), pf.d, [v], cfg)[v.name]
    url = sae_io.save(sae, Store.open(str(tmp_path / "prev")), info={}, hook_name="h", model_name="m")
    x = pf.batch(1, 4096)
    scaled = 3.0 * x                                   # the next checkpoint's residual stream is 3x larger
    tr = MultiTrainer(pf.d, [v], cfg)
    tr.init_from_data(scaled)
    tr.warm_start({v.name: url})
    new = tr.saes[v.name].eval()
    cos = (new.directions() * sae.directions()).sum(1)
    assert cos.min() > 0.999, "every latent keeps its direction at its index"
    with torch.no_grad():
        a = sae(torch.as_tensor(x)).latents > 0
        b = new(torch.as_tensor(scaled)).latents > 0
    overlap = float((a & b).sum() / (a | b).sum())
    assert overlap > 0.99, f"mostly the same latents fire on the same tokens ({overlap:.2f})"
    other = Variant("topk", 64, k=4, seed=7)           # without the warm start: another initialisation
    fresh = MultiTrainer(pf.d, [other], cfg)
    fresh.init_from_data(scaled)
    assert (fresh.saes[other.name].directions() * sae.directions()).sum(1).abs().mean() < 0.5
    gba = Variant("gba", 64)
    tr2 = MultiTrainer(pf.d, [gba], cfg)
    tr2.init_from_data(x)
    with pytest.raises(InputError, match="warm start"):
        tr2.warm_start({gba.name: url})


def test_word_list_concepts_label_tokens_and_refuse_split_words():
    """Elsewhere than storyworld a concept is a word list: a token is in it when it is one of the
    words; a word the tokenizer splits cannot label a token, and the check says which."""
    from saeray.emergence.presence import check, labels
    from saeray.harvest.corpus import Contexts
    from saeray.run.targets import expand_targets
    from saeray.spec import parse_spec
    from saeray.storyworld.tokenizer import encode

    d = json.loads(_spec())
    d["model"][0]["revisions"] = ["step0", "step8"]
    d["emergence"] = {"concepts": {"pets": ["cat", "dog"], "colours": ["red"]}}
    spec = parse_spec(json.dumps(d))
    targets = expand_targets(spec)
    check(spec, targets)
    tok = targets[0].ref.tokenizer()
    ids = np.array([encode("the cat saw a red dog and the cat".split())])
    keep = np.ones_like(ids, dtype=bool)
    keep[0, 0] = False                                    # BOS, as the harvest drops it
    names, y = labels(spec, Contexts(np.array([0]), ids, keep), tok)
    assert names == ["pets", "colours"]
    assert y[:, 0].tolist() == [False, True, False, False, False, True, False, False, True]
    assert y[:, 1].tolist() == [False, False, False, False, True, False, False, False, False]
    d["emergence"] = {"concepts": {"pets": ["cat", "zyzzyvaqq"]}}
    bad = parse_spec(json.dumps(d))
    with pytest.raises(InputError, match=r"emergence.concepts.pets: 'zyzzyvaqq' is not one known token"):
        check(bad, expand_targets(bad))

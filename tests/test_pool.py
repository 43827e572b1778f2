"""The model pool's worker objects without Ray: a forward (the harvest job, written rows equal a
direct transformers forward) and a gradient (the gradient job equals autograd on the whole model),
each through two layer-range workers chained by hand, as the pool chains them across actors."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from saeray.harvest.corpus import Corpus
from saeray.harvest.schema import acts_to_numpy
from saeray.models.load import load_model
from saeray.models.pool import Load, PoolWorker, grad_ranges, stage_ranges
from saeray.spec import CorpusSpec
from saeray.store import Store


@pytest.fixture(scope="module")
def batch(tiny_model):
    _, tok = load_model(tiny_model)
    return Corpus(CorpusSpec(n_docs=6, context_len=32), tok).contexts(0, 6)


def test_ranges():
    assert stage_ranges(4, 2) == [(0, 2), (2, 4)]
    assert grad_ranges(4, 2, first_layer=1) == [(0, 1), (1, 4)]      # layers 1..3 and the logits together
    assert grad_ranges(6, 3, first_layer=4) == [(0, 2), (2, 4), (4, 6)]
    assert grad_ranges(4, 3, first_layer=0) == [(0, 4)]


def test_forward_through_workers_writes_what_transformers_computes(tiny_model, batch, tmp_path):
    from saeray.harvest.job import HarvestJob

    store = Store.open(str(tmp_path / "t"))
    widths = {"resid_post.0": 32, "resid_post.2": 32}
    workers = [PoolWorker(Load(tiny_model), r, HarvestJob,
                          {"hookpoints": hps, "widths": widths, "store": store, "act_dtype": "float32", "meta": {}})
               for r, hps in zip(stage_ranges(4, 2), [["resid_post.0"], ["resid_post.2"]])]
    payload = {"doc": batch.doc, "ids": batch.ids, "keep": batch.keep}
    for w in workers:
        w.begin("00000")
    x = batch.ids
    for w in workers:
        x = w.forward("00000", 0, x, payload)
    assert x is None                                  # the last stage of a harvest returns nothing
    records = {}
    for w in workers:
        records.update(w.finish("00000"))
    assert set(records) == set(widths) and all(r["rows"] == batch.rows() for r in records.values())
    model, _ = load_model(tiny_model)
    with torch.no_grad():
        hs = model(torch.as_tensor(batch.ids), output_hidden_states=True).hidden_states
    for hp, L in (("resid_post.0", 1), ("resid_post.2", 3)):
        t = pads.dataset(store.path(f"acts/{hp}"), format="parquet").to_table().sort_by([("doc", "ascending"),
                                                                                           ("pos", "ascending")])
        np.testing.assert_allclose(acts_to_numpy(t["act"]), hs[L][torch.as_tensor(batch.keep)].numpy(), atol=1e-5)
    # a worker asked about an item it does not hold (restarted by Ray) says so: the pool re-runs it
    from saeray.models.pool import ItemLost

    with pytest.raises(ItemLost):
        workers[0].forward("00001", 0, batch.ids, payload)


def test_gradient_through_workers_equals_autograd(tiny_model, batch):
    from saeray.models.gradients import GradientJob

    hps = ["resid_post.1", "resid_post.2"]
    ranges = grad_ranges(4, 2, first_layer=1)
    workers = [PoolWorker(Load(tiny_model), r, GradientJob, {"hookpoints": [h for h in hps if r[0] <= int(h[-1]) < r[1]]})
               for r in ranges]
    payload = {"ids": batch.ids, "keep": batch.keep}
    for w in workers:
        w.begin("g")
    x = batch.ids
    for w in workers:
        x = w.forward("g", 0, x, payload)
    (got,) = workers[-1].finish("g")
    # reference: autograd on the whole transformers model, gradients read off the hidden states
    model, _ = load_model(tiny_model)
    ids = torch.as_tensor(batch.ids)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, output_hidden_states=True)
    hs = out.hidden_states
    for h in hs:
        h.retain_grad()
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    valid = torch.as_tensor(batch.keep[:, 1:])
    loss = (-logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[valid]).mean()
    loss.backward()
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    for hp, L in (("resid_post.1", 2), ("resid_post.2", 3)):
        torch.testing.assert_close(got[hp]["act"], hs[L].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[hp]["grad"], hs[L].grad, atol=1e-6, rtol=1e-4)
        assert got[hp]["grad"].abs().max() > 0

"""Harvest end to end on a real local Ray: exact row counts, 1- vs 2-stage pipelines identical,
S3 (moto server) path, readers without saeray (pyarrow, Ray Data, polars, duckdb), resume after
the driver or a shard actor is killed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.dataset as pads
import pytest

from saeray.harvest.reader import ActivationDataset
from saeray.harvest.schema import acts_to_numpy
from saeray.run.audit import open_run, run_targets
from saeray.run.records import Records
from saeray.spec import parse_spec

from conftest import run_and_kill_child
from saeray.store import Store


def make_spec(model: str, store: str, name: str = "h", **over) -> object:
    harvest = {"batch_size": 16, "unit_contexts": 32, "stages": 1, **over.pop("harvest", {})}
    corpus = {"n_docs": 96, "context_len": 64, **over.pop("corpus", {})}
    d = {"name": name, "model": {"name": model}, "corpus": corpus,
         "hookpoints": over.pop("hookpoints", ["resid_post.*", "mlp_post.1"]), "harvest": harvest,
         "store": store, "resources": {"harvest": {"num_cpus": 0.5}}}
    return parse_spec(json.dumps(d))


def harvest(spec):
    """Harvest the spec's one target; (its TargetContext, its HarvestResult as a dict)."""
    rc = open_run(spec)
    out = run_targets(rc, ["harvest"])[rc.targets[0].id]["harvest"]
    return rc.target(rc.targets[0]), out.to_dict()


def expected_rows(spec) -> int:
    from saeray.harvest.corpus import Corpus
    from saeray.models.load import load_tokenizer

    c = Corpus(spec.corpus, load_tokenizer(spec.models[0].name))
    return c.contexts(0, spec.corpus.n_docs).rows()


def test_row_counts_exact_and_readers(ray_local, tiny_model, tmp_path):
    spec = make_spec(tiny_model, str(tmp_path / "store"))
    ctx, out = harvest(spec)
    want = expected_rows(spec)
    hps = [f"resid_post.{i}" for i in range(4)] + ["mlp_post.1"]
    assert sorted(out["hookpoints"]) == sorted(hps)
    assert out["rows"] == want and out["units"] == 3 and len(Records(ctx.store, "harvest").load()) == 3
    for hp in hps:
        root = ctx.store.path(f"acts/{hp}")
        ds = pads.dataset(root, format="parquet")                  # plain pyarrow, no saeray
        t = ds.to_table()
        assert t.num_rows == want
        assert len(set(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))) == want  # no duplicate rows
        assert t.schema.field("act").type.list_size == (64 if hp == "mlp_post.1" else 32)
        assert str(t.schema.field("act").type.value_type) == "halffloat"
        md = {k.decode(): v.decode() for k, v in ds.schema.metadata.items()}
        assert md["saeray.hookpoint"] == hp and md["saeray.model"] == tiny_model
    import duckdb
    import polars as pl

    root = ctx.store.path("acts/resid_post.2")
    assert pl.scan_parquet(f"{root}/part-*.parquet").select(pl.len()).collect().item() == want
    assert duckdb.sql(f"select count(*), min(pos) from '{root}/part-*.parquet'").fetchall() == [(want, 1)]  # BOS dropped
    rd = ActivationDataset.from_target(ctx.store, "resid_post.2").to_ray()  # Ray Data
    assert rd.count() == want


def test_one_vs_two_stages_identical(ray_local, tiny_model, tmp_path):
    """1 stage, 2 stages, and 2 data-parallel pipelines of 2 stages give the same rows."""
    tabs = []
    for stages, replicas in ((1, 1), (2, 1), (2, 2)):
        spec = make_spec(tiny_model, str(tmp_path / f"s{stages}r{replicas}"),
                         harvest={"stages": stages, "replicas": replicas, "dtype": "float32", "unit_contexts": 8},
                         corpus={"n_docs": 40})
        ctx, out = harvest(spec)
        assert out["units"] == 5 and out["rows"] == expected_rows(spec)
        t = pads.dataset(ctx.store.path("acts/resid_post.3"), format="parquet").to_table().sort_by([("doc", "ascending"), ("pos", "ascending")])
        tabs.append(t)
        if stages == 2:
            assert out["ranges"] == [[0, 2], [2, 4]]
    a, b, c = (acts_to_numpy(t["act"]) for t in tabs)
    assert a.dtype == np.float32 and a.shape == b.shape == c.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert tabs[0]["token"].equals(tabs[1]["token"]) and tabs[0]["token"].equals(tabs[2]["token"])


def test_activations_match_model_forward(ray_local, tiny_model, tmp_path):
    import torch

    from saeray.harvest.corpus import Corpus
    from saeray.models.load import load_model

    spec = make_spec(tiny_model, str(tmp_path / "st"), harvest={"dtype": "float32"}, corpus={"n_docs": 8},
                     hookpoints=["resid_post.1"])
    ctx, _ = harvest(spec)
    t = pads.dataset(ctx.store.path("acts/resid_post.1"), format="parquet").to_table().sort_by([("doc", "ascending"), ("pos", "ascending")])
    model, tok = load_model(tiny_model)
    c = Corpus(spec.corpus, tok).contexts(0, 8)
    with torch.no_grad():
        hs = model(torch.as_tensor(c.ids), output_hidden_states=True).hidden_states[2]
    want = hs[torch.as_tensor(c.keep)].numpy()
    np.testing.assert_allclose(acts_to_numpy(t["act"]), want, atol=1e-5)


def test_s3_end_to_end(ray_local, tiny_model, s3_url):
    spec = make_spec(tiny_model, s3_url, name="s3run", hookpoints=["resid_post.0", "resid_post.3"])
    ctx, out = harvest(spec)
    want = expected_rows(spec)
    st = Store.open(s3_url) / "s3run" / "targets" / "neox@main"
    assert st.ls("acts") == ["resid_post.0", "resid_post.3"]
    assert sorted(st.ls("acts/resid_post.3")) == [f"part-{u:05d}.parquet" for u in range(3)]
    ds = ActivationDataset.from_target(st, "resid_post.3", batch_size=100, shuffle_buffer=500)
    assert ds.num_rows == want
    assert ds.to_ray().count() == want
    # a second run over the same store is a no-op: nothing re-harvested, nothing duplicated
    ctx2, out2 = harvest(spec)
    assert out2["rows"] == want and len(st.ls("acts/resid_post.3")) == 3


def test_reader_exact_epochs_and_determinism(ray_local, tiny_model, tmp_path):
    spec = make_spec(tiny_model, str(tmp_path / "r"), hookpoints=["resid_post.0"], harvest={"dtype": "float32"})
    ctx, out = harvest(spec)
    ds = ActivationDataset.from_target(ctx.store, "resid_post.0", batch_size=128, shuffle_buffer=1000, seed=3)
    full = acts_to_numpy(pads.dataset(ctx.store.path("acts/resid_post.0"), format="parquet").to_table()["act"])
    for e in range(2):
        got = np.concatenate(list(ds.epoch(e)))
        assert len(got) == len(full)  # every row exactly once
        assert sorted(map(bytes, got)) == sorted(map(bytes, full))
    e0, e0b, e1 = (np.concatenate(list(ds.epoch(e))) for e in (0, 0, 1))
    np.testing.assert_array_equal(e0, e0b)     # same (seed, epoch) -> same order
    assert not np.array_equal(e0, e1)          # reshuffled between epochs
    assert not np.array_equal(e0, full)        # actually shuffled
    n = sum(len(b) for b in ds.batches(tokens=len(full) * 2 + 7))
    assert n == len(full) * 2 + 7


def test_resume_after_driver_killed(ray_local, tiny_model, tmp_path):
    store = tmp_path / "store"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(textwrap.dedent(f"""\
        name: killme
        model: {{name: {tiny_model}}}
        corpus: {{n_docs: 480, context_len: 64}}
        hookpoints: ["resid_post.*"]
        harvest: {{batch_size: 4, unit_contexts: 16, max_in_flight: 1}}
        store: {store}
        resources: {{harvest: {{num_cpus: 0.5}}}}
        """))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "saeray", "--address", address, "harvest", str(spec_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = Store.open(str(store)) / "killme" / "targets" / "neox@main"
    records = Records(run, "harvest")
    deadline = time.monotonic() + 120
    n_done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        n_done = len(records.names())
        if n_done >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= n_done < 30, "the driver must die mid-run for this test to mean anything"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = parse_spec(spec_path.read_text())
    want = expected_rows(spec)
    recs = records.load()
    assert len(recs) == 30 and sum(r["rows"] for r in recs.values()) == want
    t = pads.dataset(run.path("acts/resid_post.2"), format="parquet").to_table()
    assert t.num_rows == want
    assert len(set(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))) == want
    assert not [p for p in run.fs.find(run.path()) if ".tmp-" in p]


def test_resume_after_shard_actor_killed(ray_local, tiny_model, tmp_path):
    spec = make_spec(tiny_model, str(tmp_path / "store"), name="actorkill", hookpoints=["resid_post.*"],
                     harvest={"stages": 2, "batch_size": 4, "unit_contexts": 16, "max_in_flight": 1},
                     corpus={"n_docs": 320})
    rc = open_run(spec)
    ctx = rc.target(rc.targets[0])
    killed, result = run_and_kill_child(
        lambda: run_targets(rc, ["harvest"]), "PoolWorker",
        ready=lambda: len(Records(ctx.store, "harvest").names()) >= 2, which=-1)
    assert killed is not None, "an actor must be killed mid-run"
    assert "err" not in result, result.get("err")
    want = expected_rows(spec)
    recs = Records(ctx.store, "harvest").load()
    assert len(recs) == 20 and sum(r["rows"] for r in recs.values()) == want
    for hp in ("resid_post.0", "resid_post.3"):
        t = pads.dataset(ctx.store.path(f"acts/{hp}"), format="parquet").to_table()
        assert t.num_rows == want
        assert len(set(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))) == want


def test_text_corpus_sources(ray_local, tiny_model, tmp_path):
    from saeray.harvest.corpus import Corpus
    from saeray.models.load import load_tokenizer
    from saeray.spec import CorpusSpec

    words = "the cat sat on the mat and the dog ran to oslo".split()
    docs = [" ".join(words[i % 5:] + words[: i % 5]) for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    tok = load_tokenizer(tiny_model)
    got = []
    for src, field in ((tmp_path / "a.txt", "text"), (tmp_path / "b.jsonl", "body"), (tmp_path / "c.parquet", "body")):
        c = Corpus(CorpusSpec(source=str(src), text_field=field, n_docs=10, context_len=16, heldout_docs=2), tok)
        ctx = c.contexts(0, 10)
        assert ctx.ids.shape == (10, 16) and ctx.keep[:, 1:].all() and not ctx.keep[:, 0].any()
        got.append(ctx.ids)
        assert c.heldout().ids.shape == (2, 16)
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])

    # the text is tokenized once: units in any order (a retried unit included) and the held-out
    # contexts evaluation reads are slices of the same token stream
    class Counting:
        def __init__(self, tok):
            self.tok, self.calls = tok, 0

        def __getattr__(self, k):
            return getattr(self.tok, k)

        def __call__(self, *a, **kw):
            self.calls += 1
            return self.tok(*a, **kw)

    spec = CorpusSpec(source=str(tmp_path / "a.txt"), n_docs=10, context_len=16, heldout_docs=2)
    once = Counting(tok)
    Corpus(spec, once).contexts(0, 10)
    ctok = Counting(tok)
    c = Corpus(spec, ctok)
    parts = [c.contexts(a, b) for a, b in ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10))]
    assert ctok.calls == once.calls   # every document tokenized once, as by a single read
    np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), got[0])
    np.testing.assert_array_equal(c.contexts(2, 4).ids, got[0][2:4])
    np.testing.assert_array_equal(c.contexts(4, 6).ids, got[0][4:6])
    assert c.heldout().ids.shape == (2, 16)
    assert ctok.calls == once.calls   # evaluation's held-out contexts reused the harvest's tokens
    from saeray.harvest.corpus import corpus_for

    assert corpus_for(spec, tok) is corpus_for(spec, tok)   # one tokenization per (corpus, tokenizer) per run
    from saeray.errors import InputError

    with pytest.raises(InputError, match="no field 'text'"):
        Corpus(CorpusSpec(source=str(tmp_path / "b.jsonl"), n_docs=1, context_len=16), tok).contexts(0, 1)
    with pytest.raises(InputError, match="only .* contexts"):
        Corpus(CorpusSpec(source=str(tmp_path / "a.txt"), n_docs=10_000, context_len=16), tok).contexts(0, 10_000)


def test_skip_first_drops_attention_sink_positions(tiny_model, tmp_path):
    """corpus.skip_first: the first real tokens of every context are not kept (text and storyworld)."""
    from saeray.harvest.corpus import Corpus
    from saeray.models.load import load_tokenizer
    from saeray.spec import CorpusSpec

    tok = load_tokenizer(tiny_model)
    (tmp_path / "a.txt").write_text("\n\n".join(" ".join(["the cat sat on the mat"] * 5) for _ in range(40)))
    for source in (str(tmp_path / "a.txt"), "storyworld"):
        base = Corpus(CorpusSpec(source=source, n_docs=8, context_len=16), tok).contexts(0, 8)
        skip = Corpus(CorpusSpec(source=source, n_docs=8, context_len=16, skip_first=2), tok).contexts(0, 8)
        np.testing.assert_array_equal(base.ids, skip.ids)                       # same tokens, fewer rows
        assert not skip.keep[:, :3].any()                                       # BOS + 2 sink positions
        np.testing.assert_array_equal(skip.keep[:, 3:], base.keep[:, 3:])
        assert skip.rows() == base.rows() - 2 * 8

"""The built-in English corpus (CPython's reference topics and stdlib docstrings): written once,
deterministic, read through the ordinary text-corpus path."""
from __future__ import annotations

import json

from saeray.harvest.corpus import Corpus
from saeray.harvest.python_docs import MIN_CHARS, materialize
from saeray.spec import CorpusSpec


def test_python_docs_corpus(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("SAERAY_CACHE", str(tmp_path / "cache"))
    path = materialize()
    assert path.parent == tmp_path / "cache" / "corpora" and path.stat().st_size > 1_500_000   # megabytes of text
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert docs[0]["source"].startswith("pydoc_data.topics:") and len(docs) > 2000
    assert all(len(d["text"]) >= MIN_CHARS or d["source"].startswith("pydoc_data") for d in docs)
    skipped = ("test", "idlelib", "lib2to3", "turtledemo", "ensurepip")          # test suites, tools, vendored code
    assert not [d for d in docs if d["source"].split(".")[0] in skipped or ".test." in d["source"].split(":")[0]
                and d["source"].startswith("unittest.test")]
    assert any(d["source"] == "json.dumps" for d in docs)                   # a stdlib docstring, by qualified name
    mtime = path.stat().st_mtime_ns
    assert materialize() == path and path.stat().st_mtime_ns == mtime        # written once
    from saeray.models.load import load_tokenizer

    c = Corpus(CorpusSpec(source="python-docs", n_docs=64, context_len=64, heldout_docs=8), load_tokenizer(tiny_model))
    ctx = c.contexts(0, 64)
    assert ctx.ids.shape == (64, 64) and ctx.keep[:, 1:].all()
    assert c.heldout().doc[0] == 64

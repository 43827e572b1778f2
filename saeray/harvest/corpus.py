"""Corpus -> fixed-length token contexts -> deterministic work units.

Sources (``corpus.source`` in the spec):

* ``storyworld`` (default): context ``i`` is storyworld document ``i`` of the train split (held-out
  evaluation uses the ``heldout`` split), one document per context, padded. Because the generator
  is a pure function of (seed, split, index), every row's planted labels can be recomputed from its
  ``doc`` column later.
* a ``.txt`` (documents separated by blank lines), ``.jsonl`` (``text_field`` per line) or
  ``.parquet`` (``text_field`` column) file, a folder of them, or a glob; local or ``s3://``.
  Documents are tokenized with the model's tokenizer, joined with EOS, and cut into contexts of
  ``context_len`` tokens (BOS first when the tokenizer has one), in file order.

A work unit is ``unit_contexts`` consecutive contexts: unit ``u`` covers contexts
``[u*U, (u+1)*U)``. Rows kept per context: every real token, minus position 0 when it is BOS and
``drop_bos`` is set; padding is never kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import InputError


@dataclass
class Contexts:
    doc: np.ndarray    # [n] int64 context index
    ids: np.ndarray    # [n, T] int64 input ids (padded)
    keep: np.ndarray   # [n, T] bool: rows to emit

    def __len__(self) -> int:
        return len(self.doc)

    def rows(self) -> int:
        return int(self.keep.sum())

    def slice(self, a: int, b: int) -> "Contexts":
        return Contexts(self.doc[a:b], self.ids[a:b], self.keep[a:b])


def _special_ids(tokenizer) -> tuple[int | None, int, int | None]:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return bos, pad, eos


def _pack(token_lists: list[list[int]], first_doc: int, T: int, bos: int | None, pad: int, drop_bos: bool) -> Contexts:
    n = len(token_lists)
    ids = np.full((n, T), pad, dtype=np.int64)
    keep = np.zeros((n, T), dtype=bool)
    for i, toks in enumerate(token_lists):
        seq = ([bos] if bos is not None else []) + list(toks)
        seq = seq[:T]
        ids[i, : len(seq)] = seq
        keep[i, : len(seq)] = True
        if bos is not None and drop_bos:
            keep[i, 0] = False
    return Contexts(np.arange(first_doc, first_doc + n, dtype=np.int64), ids, keep)


class Corpus:
    """Contexts in a fixed order for one (corpus spec, tokenizer)."""

    def __init__(self, corpus_spec, tokenizer):
        self.spec = corpus_spec
        self.tok = tokenizer
        self.T = corpus_spec.context_len
        self.bos, self.pad, self.eos = _special_ids(tokenizer)
        self.is_storyworld = corpus_spec.source == "storyworld"
        if not self.is_storyworld:
            self.files = _list_text_files(corpus_spec.source)
        self._cursor: tuple[int, Iterator[list[int]]] | None = None  # (index of the next context, stream)

    # -- storyworld -------------------------------------------------------------------------------
    def _storyworld(self, start: int, stop: int, split: str) -> Contexts:
        from ..storyworld.generator import generate_words

        texts = [" ".join(generate_words(i, seed=self.spec.seed, split=split)) for i in range(start, stop)]
        enc = self.tok(texts, add_special_tokens=False)["input_ids"]
        return _pack(enc, start, self.T, self.bos, self.pad, self.spec.drop_bos)

    # -- text files -------------------------------------------------------------------------------
    def _text_contexts(self) -> Iterator[list[int]]:
        """Token lists of length T - (1 if BOS) in corpus order, forever-free (stops at the end)."""
        body = self.T - (1 if self.bos is not None else 0)
        buf: list[int] = []
        for text in _iter_texts(self.files, self.spec.text_field):
            buf.extend(self.tok(text, add_special_tokens=False)["input_ids"])
            if self.eos is not None:
                buf.append(self.eos)
            while len(buf) >= body:
                yield buf[:body]
                buf = buf[body:]

    def _text(self, start: int, stop: int) -> Contexts:
        # Units are asked for in order, so the stream carries on from where the last one stopped
        # instead of re-reading and re-tokenizing the corpus from its start for every unit
        # (quadratic in the corpus); a request behind the cursor (a retried unit) starts over.
        if self._cursor is None or self._cursor[0] > start:
            self._cursor = (0, self._text_contexts())
        i, stream = self._cursor
        out = []
        while i < stop:
            toks = next(stream, None)
            if toks is None:
                break
            if i >= start:
                out.append(toks)
            i += 1
        self._cursor = (i, stream)
        if len(out) < stop - start:
            raise InputError(f"corpus {self.spec.source}: only {i} contexts of {self.T} tokens available, "
                             f"{stop} needed; lower corpus.n_docs / corpus.heldout_docs or add text")
        return _pack(out, start, self.T, self.bos, self.pad, self.spec.drop_bos)

    # -- public -----------------------------------------------------------------------------------
    def contexts(self, start: int, stop: int) -> Contexts:
        """Training contexts [start, stop)."""
        if self.is_storyworld:
            return self._storyworld(start, stop, "train")
        return self._text(start, stop)

    def heldout(self) -> Contexts:
        """Held-out contexts for evaluation: the storyworld held-out split, or the text contexts
        that follow the harvested ones."""
        n, h = self.spec.n_docs, self.spec.heldout_docs
        if self.is_storyworld:
            return self._storyworld(0, h, "heldout")
        c = self._text(n, n + h)
        return c


@dataclass(frozen=True)
class Units:
    n_contexts: int
    per_unit: int

    @property
    def count(self) -> int:
        return -(-self.n_contexts // self.per_unit)

    def bounds(self, u: int) -> tuple[int, int]:
        a = u * self.per_unit
        return a, min(a + self.per_unit, self.n_contexts)

    @staticmethod
    def name(u: int) -> str:
        return f"{u:05d}"


def _list_text_files(source: str) -> list[str]:
    import fsspec

    exts = (".txt", ".jsonl", ".parquet")
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(p for p in fs.find(path) if p.endswith(exts))
        elif fs.exists(path):
            files = [path]
        else:
            files = []
    except Exception as e:  # noqa: BLE001 - surface as an input problem with the source named
        raise InputError(f"corpus.source {source!r}: cannot list it ({e})") from None
    if not files:
        raise InputError(f"corpus.source {source!r}: no .txt/.jsonl/.parquet files found; "
                         "use 'storyworld' or a path/URL to text files")
    bad = [f for f in files if not f.endswith(exts)]
    if bad:
        raise InputError(f"corpus.source: unsupported file {bad[0]!r}; use .txt, .jsonl or .parquet")
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [f if proto in ("file", "local") else f"{proto}://{f}" for f in files]


def _iter_texts(files: list[str], field: str) -> Iterator[str]:
    import fsspec

    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fsspec.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if field not in pf.schema_arrow.names:
                    raise InputError(f"{f}: no column '{field}' (columns: {pf.schema_arrow.names}); set corpus.text_field")
                for batch in pf.iter_batches(columns=[field], batch_size=1024):
                    for t in batch.column(0).to_pylist():
                        if t:
                            yield t
        elif f.endswith(".jsonl"):
            with fsspec.open(f, "r") as fh:
                for ln, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{f}:{ln}: not valid JSON ({e.msg})") from None
                    if field not in obj:
                        raise InputError(f"{f}:{ln}: no field '{field}'; set corpus.text_field")
                    if obj[field]:
                        yield obj[field]
        else:
            with fsspec.open(f, "r") as fh:
                para: list[str] = []
                for line in fh:
                    if line.strip():
                        para.append(line.rstrip("\n"))
                    elif para:
                        yield "\n".join(para)
                        para = []
                if para:
                    yield "\n".join(para)

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
``drop_bos`` is set, minus the first ``skip_first`` real tokens; padding is never kept.
``skip_first`` exists for attention-sink positions: language models park huge, content-free
activations on the first token(s) of a context (Sun et al. 2024, "Massive activations"; SmolLM2's
first real token has residual norms ~140x the median from layer ~10 on, docs/benchmarks.md), which
would dominate an SAE's reconstruction loss. Rows not kept are neither harvested, trained on, nor
replaced by an SAE in evaluation.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
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


def _pack(token_lists: list[list[int]], first_doc: int, T: int, bos: int | None, pad: int, drop_bos: bool,
          skip_first: int = 0) -> Contexts:
    n = len(token_lists)
    ids = np.full((n, T), pad, dtype=np.int64)
    keep = np.zeros((n, T), dtype=bool)
    for i, toks in enumerate(token_lists):
        seq = ([bos] if bos is not None else []) + list(toks)
        seq = seq[:T]
        ids[i, : len(seq)] = seq
        keep[i, : len(seq)] = True
    if bos is not None and drop_bos:
        keep[:, 0] = False
    first = 1 if bos is not None else 0
    keep[:, first:first + skip_first] = False
    return Contexts(np.arange(first_doc, first_doc + n, dtype=np.int64), ids, keep)


class Corpus:
    """Contexts in a fixed order for one (corpus spec, tokenizer). Get one with :func:`corpus_for`,
    which tokenizes a text corpus once per tokenizer and hands the same object to every stage and
    target that shares it (evaluation's held-out contexts are a slice of the same tokens)."""

    def __init__(self, corpus_spec, tokenizer):
        self.spec = corpus_spec
        self.tok = tokenizer
        self.T = corpus_spec.context_len
        self.bos, self.pad, self.eos = _special_ids(tokenizer)
        self.is_storyworld = corpus_spec.source == "storyworld"
        if corpus_spec.source == "python-docs":   # built-in English text (saeray/harvest/python_docs.py)
            from .python_docs import materialize

            self.files = [str(materialize())]
        elif not self.is_storyworld:
            self.files = _list_text_files(corpus_spec.source)
        self._flat: np.ndarray | None = None    # text sources: every token the run needs, in order
        self._lock = threading.Lock()

    # -- storyworld -------------------------------------------------------------------------------
    def _storyworld(self, start: int, stop: int, split: str) -> Contexts:
        from ..storyworld.generator import generate_words

        texts = [" ".join(generate_words(i, seed=self.spec.seed, split=split)) for i in range(start, stop)]
        enc = self.tok(texts, add_special_tokens=False)["input_ids"]
        return _pack(enc, start, self.T, self.bos, self.pad, self.spec.drop_bos, self.spec.skip_first)

    # -- text files -------------------------------------------------------------------------------
    @property
    def body(self) -> int:
        return self.T - (1 if self.bos is not None else 0)

    def tokens(self) -> np.ndarray:
        """The corpus as one token stream (documents joined with EOS), cut after the last token the
        harvested and held-out contexts need. Linear in corpus size: documents are tokenized in
        batches and concatenated once."""
        with self._lock:
            if self._flat is None:
                need = (self.spec.n_docs + self.spec.heldout_docs) * self.body
                parts: list[np.ndarray] = []
                total = 0
                texts: list[str] = []

                def flush() -> None:
                    nonlocal total
                    for ids in self.tok(texts, add_special_tokens=False)["input_ids"]:
                        if self.eos is not None:
                            ids = [*ids, self.eos]
                        parts.append(np.asarray(ids, dtype=np.int64))
                        total += len(ids)
                    texts.clear()

                for text in _iter_texts(self.files, self.spec.text_field, self.spec.encoding):
                    texts.append(text)
                    if len(texts) >= 256:
                        flush()
                        if total >= need:
                            break
                if texts:
                    flush()
                self._flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return self._flat

    def available(self) -> int:
        """Whole contexts the corpus holds (text sources; storyworld is unbounded)."""
        if self.is_storyworld:
            return 1 << 62
        return len(self.tokens()) // self.body

    def _text(self, start: int, stop: int) -> Contexts:
        flat = self.tokens()
        have = len(flat) // self.body
        if stop > have:
            raise InputError(f"corpus {self.spec.source}: only {have} contexts of {self.T} tokens available, "
                             f"{stop} needed; lower corpus.n_docs / corpus.heldout_docs or add text")
        body = flat[start * self.body: stop * self.body].reshape(stop - start, self.body)
        return _pack(body.tolist(), start, self.T, self.bos, self.pad, self.spec.drop_bos, self.spec.skip_first)

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
        return self._text(n, n + h)

    def check(self, need_heldout: bool) -> None:
        """Fail before any forward pass when the corpus cannot supply what the run asks for."""
        need = self.spec.n_docs + (self.spec.heldout_docs if need_heldout else 0)
        have = self.available()
        if have < need:
            raise InputError(f"corpus.source {self.spec.source!r}: holds {have} contexts of {self.T} tokens, the run "
                             f"needs {need} (corpus.n_docs {self.spec.n_docs}"
                             f"{f' + corpus.heldout_docs {self.spec.heldout_docs}' if need_heldout else ''}); "
                             "lower them or add text")


def tokenizer_key(tokenizer) -> str:
    """Identifies a tokenizer by what it does (its serialized form), so checkpoints of one model
    share one tokenization."""
    key = getattr(tokenizer, "_saeray_key", None)
    if key is None:   # serializing a 50k-entry tokenizer costs ~0.1 s: once per tokenizer object
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        key = tokenizer._saeray_key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return key


_CORPORA: "OrderedDict[tuple, Corpus]" = OrderedDict()
_CORPORA_LOCK = threading.Lock()


def corpus_for(corpus_spec, tokenizer, keep: int = 4) -> Corpus:
    """The :class:`Corpus` of (corpus spec, tokenizer), shared by every caller in this process."""
    key = (tokenizer_key(tokenizer), json.dumps(corpus_spec.model_dump(mode="json"), sort_keys=True))
    with _CORPORA_LOCK:
        if key in _CORPORA:
            _CORPORA.move_to_end(key)
            return _CORPORA[key]
        c = _CORPORA[key] = Corpus(corpus_spec, tokenizer)
        while len(_CORPORA) > keep:
            _CORPORA.popitem(last=False)
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


def _lines(url: str, encoding: str):
    """The lines of a text file (local or s3://); bytes that are not ``encoding`` are an InputError
    naming the file, the line and the byte, with the corpus.encoding to set."""
    import fsspec

    ln = 0
    try:
        with fsspec.open(url, "r", encoding=encoding) as fh:
            for ln, line in enumerate(fh, 1):
                yield ln, line
    except UnicodeError as e:
        bad = e.object[e.start:e.start + 4] if isinstance(getattr(e, "object", None), bytes) else b""
        raise InputError(f"{url}: not {encoding} text near line {ln + 1} (bytes {bad!r}: {e.reason}); set "
                         "corpus.encoding to the file's encoding (e.g. latin-1, cp1252, utf-16) or convert the file "
                         "to UTF-8") from None
    except FileNotFoundError:
        raise   # callers name what the file was for (corpus.source, a prompt set)
    except OSError as e:
        raise InputError(f"{url}: cannot read it ({e}); check the path and permissions") from None


def iter_jsonl(url: str, encoding: str = "utf-8"):
    """(line number, object) of every non-blank line of a JSON-lines file (local or s3://); a line
    that is not JSON is an InputError naming the file and line."""
    for ln, line in _lines(url, encoding):
        if not line.strip():
            continue
        try:
            yield ln, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{url}:{ln}: not valid JSON ({e.msg})") from None


def _iter_parquet(f: str, field: str) -> Iterator[str]:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fsspec.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if field not in pf.schema_arrow.names:
                raise InputError(f"{f}: no column '{field}' (columns: {pf.schema_arrow.names}); set corpus.text_field")
            kind = pf.schema_arrow.field(field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise InputError(f"{f}: column '{field}' holds {kind}, not text; set "
                                 "corpus.text_field to a string column")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for t in batch.column(0).to_pylist():
                    if t:
                        yield t
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{f}: not a readable Parquet file ({e}); replace or remove it") from None


def _iter_texts(files: list[str], field: str, encoding: str = "utf-8") -> Iterator[str]:
    for f in files:
        if f.endswith(".parquet"):
            yield from _iter_parquet(f, field)
        elif f.endswith(".jsonl"):
            for ln, obj in iter_jsonl(f, encoding):
                if not isinstance(obj, dict) or field not in obj:
                    raise InputError(f"{f}:{ln}: no field '{field}'; set corpus.text_field")
                if not isinstance(obj[field], str):
                    raise InputError(f"{f}:{ln}: field '{field}' is {type(obj[field]).__name__}, not text")
                if obj[field]:
                    yield obj[field]
        else:
            para: list[str] = []
            for _, line in _lines(f, encoding):
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    yield "\n".join(para)
                    para = []
            if para:
                yield "\n".join(para)

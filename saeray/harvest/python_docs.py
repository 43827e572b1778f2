"""``corpus.source: python-docs``: real human-written English that every Python install carries,
so a real-model audit needs no download.

The text is CPython's own documentation: the language reference topics ``pydoc_data.topics``
(what ``help()`` shows: ~465 kB) and the docstrings of the standard library's modules, classes and
functions (parsed from the source files with :mod:`ast`, never imported: some stdlib modules act on
import). Test suites, ``idlelib``, demo and vendored packages are skipped, as are docstrings under
80 characters (mostly one-line signatures). One document per topic or docstring, in a fixed order
(topics by name, then files by path), so the corpus is a pure function of the Python version.
Written once as JSON Lines into saeray's cache and read through the ordinary text-corpus path.

License: the Python documentation and source are under the PSF License Agreement (Python Software
Foundation License Version 2), which allows copying and derived works with the notice kept
(docs/models.md, "Corpora").
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

NAME = "python-docs"
MIN_CHARS = 80
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
              "ensurepip", "__phello__", "pydoc_data"}


def documents() -> Iterator[dict]:
    """Every document, in corpus order: {"text", "source"}."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield {"text": topics[key].strip(), "source": f"pydoc_data.topics:{key}"}
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            path = Path(dirpath) / f
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)   # json/__init__.py is json
            for node, qual in _documented(tree, module):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield {"text": doc, "source": qual}


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[ast.AST, str]]:
    yield tree, module

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[ast.AST, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                q = f"{prefix}.{child.name}"
                yield child, q
                yield from walk(child, q)

    yield from walk(tree, module)


def materialize(cache_dir: str | os.PathLike | None = None) -> Path:
    """The corpus as JSON Lines in saeray's cache (written once per Python version)."""
    from ..storyworld.zoo import cache_root

    ver = ".".join(map(str, sys.version_info[:3]))
    out = Path(cache_dir) if cache_dir else cache_root() / "corpora"
    final = out / f"{NAME}-{ver}.jsonl"
    if final.is_file():
        return final
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}-{final.name}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in documents():
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, final)   # complete or absent, also when two processes race
    return final

"""The store: every artifact of a run lives under one URL — a local path (default ``./runs``),
``file://...``, or ``s3://bucket/prefix`` through s3fs — and is written through this one class.

Writes are atomic from a reader's view (a file appears whole at its final name or not at all), and
each object is written exactly once:

* **S3**: data goes straight to the final key. s3fs sends a small file as one PutObject when the
  file is closed and a big one as a multipart upload that is completed when the file is closed;
  S3 makes either visible only when that last request succeeds. If the ``with`` body raises, the
  file is discarded instead of closed (an open multipart upload is aborted), so nothing appears and
  an object already at that key is left unchanged. No temporary object and no server-side
  copy: a copy + delete "rename" would write every byte twice.
* **Local folders**: data goes to a hidden temporary (``<dir>/.tmp-<uuid>-<name>``; readers such
  as pyarrow.dataset skip names starting with '.') that ``os.replace`` renames to the final name
  once fully written; a rename within one filesystem copies nothing. A crash mid-write leaves at
  most a hidden temporary that :meth:`Store.sweep_tmp` removes (it also clears ``.tmp-`` objects
  that older versions left on S3).

What counts as *done* is decided by the run's records (:mod:`saeray.manifest`,
:mod:`saeray.run.records`), written after the data.

S3 endpoint, region and credentials come from the spec's ``store`` section (``${ENV}`` placeholders
resolved in memory) or, when absent, from the standard AWS environment / config files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""
from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from .errors import InputError
from .faults import crash_point

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SCHEMES = ("file", "s3")


def check_url(url: str) -> None:
    """Raise ValueError (with what to do) unless ``url`` is a store URL we can write to."""
    if not url or not url.strip():
        raise ValueError("store URL is empty; use a local folder (./runs), file:///abs/path or s3://bucket/prefix")
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported store URL scheme '{scheme}://'; use a local folder, file:///abs/path or s3://bucket/prefix")
        if scheme == "s3":
            bucket = rest.split("/", 1)[0]
            if not _BUCKET.match(bucket):
                raise ValueError(f"'{url}': '{bucket}' is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-'); use s3://bucket/prefix")
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError(f"'{url}': file:// URLs need an absolute path (file:///abs/path)")


_BAD_PART = re.compile(r"^\.{1,2}$|[\\\x00-\x1f]|^~|:")


def check_rel(rel: str) -> str:
    """``rel`` as a path below a store folder; names that could leave it (``..``, ``.``, a leading ``~``,
    a scheme or drive ``x:``, backslashes, control characters) are refused. A leading '/' is not
    absolute here: every caller means "below this folder", so it is stripped, as before."""
    parts = rel.strip("/").split("/")
    for p in parts:
        if p == "" or _BAD_PART.search(p):
            raise InputError(f"store path '{rel}': the part {p!r} could leave the store folder; names of runs, "
                             "targets and hook points are single path parts of letters, digits, '.', '_', '@', '=' "
                             "and '-'")
    return "/".join(parts)


@dataclass
class Store:
    """A folder on some filesystem. ``Store.open(url)``; ``store / "run" / "acts"`` for sub-folders."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets: never log

    def __post_init__(self) -> None:
        try:
            check_url(self.url)
        except ValueError as e:
            raise InputError(f"store: {e}") from None
        self.url = self.url.rstrip("/") if self.url not in ("/",) else self.url
        fs, path = fsspec.core.url_to_fs(self.url, **self._fs_kwargs())
        self.fs = fs
        self.root = path.rstrip("/")
        self.is_local = self.url.startswith("file://") or "://" not in self.url

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, endpoint_url: str | None = None, region: str | None = None,
             key: str | None = None, secret: str | None = None, retries: int | None = None) -> "Store":
        """``retries``: attempts per S3 request on transient errors (:mod:`saeray.storefaults`; default 10)."""
        opts = {k: v for k, v in dict(endpoint_url=endpoint_url, region=region, key=key, secret=secret,
                                      retries=retries).items() if v}
        if "://" not in url:
            url = os.path.abspath(url)
        return cls(url, opts)

    @classmethod
    def from_spec(cls, store_spec) -> "Store":
        """From a (resolved) :class:`saeray.spec.StoreSpec`."""
        return cls.open(store_spec.url, store_spec.endpoint_url, store_spec.region, store_spec.key, store_spec.secret,
                        retries=getattr(store_spec, "retries", None))

    def _fs_kwargs(self) -> dict:
        if not self.url.startswith("s3://"):
            return {}
        from .storefaults import s3_class

        s3_class()  # registers saeray's retrying s3fs class as fsspec's "s3", which url_to_fs then opens
        kw: dict[str, Any] = {"store_url": self.url}
        if self.options.get("retries"):
            kw["attempts"] = int(self.options["retries"])
        client: dict[str, Any] = {}
        endpoint = self.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        region = self.options.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            client["region_name"] = region
        if client:
            kw["client_kwargs"] = client
        if self.options.get("key"):
            kw["key"] = self.options["key"]
            kw["secret"] = self.options.get("secret")
        # fresh instances: s3fs caches listings per instance, and we read what other processes wrote
        kw["skip_instance_cache"] = True
        kw["use_listings_cache"] = False
        return kw

    def __truediv__(self, part: str) -> "Store":
        return Store(f"{self.url}/{check_rel(part)}", self.options)

    def __reduce__(self):  # picklable for Ray: rebuilt from url + options in the worker
        return (Store, (self.url, self.options))

    # -- paths ----------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        return f"{self.root}/{check_rel(rel)}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{check_rel(rel)}" if rel else self.url

    # -- reading --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url_of(rel)} does not exist") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, hidden temporaries excluded; [] if missing."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if not n.startswith(".tmp-"))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    # -- atomic writing -------------------------------------------------------------------------
    def _tmp_for(self, rel: str) -> str:
        d, _, name = self.path(rel).rpartition("/")
        return f"{d}/.tmp-{uuid.uuid4().hex[:12]}-{name}"

    @contextmanager
    def open_write(self, rel: str) -> Iterator[Any]:
        """A binary file that appears at ``rel`` only after the ``with`` block succeeds."""
        if self.is_local:
            with self._write_local(rel) as f:
                yield f
        else:
            with self._write_s3(rel) as f:
                yield f

    @contextmanager
    def _write_local(self, rel: str) -> Iterator[Any]:
        final = self.path(rel)
        self.fs.makedirs(final.rpartition("/")[0], exist_ok=True)
        tmp = self._tmp_for(rel)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
                crash_point(rel, f, tmp)
            os.replace(tmp, final)  # atomic rename on one filesystem
        except BaseException:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except Exception:  # pragma: no cover - best effort; sweep_tmp cleans leftovers
                pass
            raise

    @contextmanager
    def _write_s3(self, rel: str) -> Iterator[Any]:
        # Not ``with fs.open(...)``: its __exit__ closes the file, and closing an s3fs file commits
        # it (PutObject or CompleteMultipartUpload) even when the body raised.
        f = self.fs.open(self.path(rel), "wb")
        try:
            yield f
            crash_point(rel, f, None)
            f.close()  # the commit: the object appears now, whole
        except BaseException:
            try:
                f.discard()  # aborts the multipart upload if one was started; drops the buffer
            except Exception:  # pragma: no cover - a dangling upload stays invisible; an AbortIncompleteMultipartUpload lifecycle rule reaps it
                pass
            f.closed = True  # else its __del__ tries to close (commit) the dropped buffer and fails noisily
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode())

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Upload every file of a local folder under ``rel`` (each file atomically)."""
        for dirpath, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(dirpath, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as fsrc, self.open_write(f"{rel}/{sub}") as fdst:
                    while chunk := fsrc.read(8 << 20):
                        fdst.write(chunk)

    def get_dir(self, rel: str, local_dir: str) -> None:
        self.fs.get(self.path(rel).rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)

    def rm(self, rel: str, recursive: bool = False) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=recursive)

    def sweep_tmp(self, rel: str = "") -> int:
        """Remove hidden temporaries left by crashed writers under ``rel``; returns how many."""
        try:
            found = self.fs.find(self.path(rel))
        except FileNotFoundError:
            return 0
        stale = [p for p in found if p.rsplit("/", 1)[-1].startswith(".tmp-")]
        for p in stale:
            self.fs.rm(p)
        return len(stale)

    def check_writable(self) -> None:
        """Raise InputError (exit 2) unless this store can be reached and written with the settings
        given: a hidden probe object is written next to the run's folders and deleted. Existing
        objects are never touched; on S3 a short retry budget (an unreachable store at start is a
        configuration problem, not an outage)."""
        from .storefaults import check_writable

        check_writable(self)

    # -- interop --------------------------------------------------------------------------------
    def arrow_fs(self):
        """A pyarrow filesystem and root path, for pyarrow.dataset / Ray Data."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.root
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.root

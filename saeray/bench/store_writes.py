"""``saeray bench store``: bytes written to the store, per policy.

**record bytes** — recording N finished work units (N = 300 and 3 000 by default), each unit
record shaped like a real harvest unit's: 72 hook points (a 24-layer model x 3 sites), each with
path, rows, bytes and sha256 of its Parquet file (~14 kB of JSON per unit). Two policies:

* ``records`` (the current one): :meth:`saeray.run.records.Records.put` once per unit, then one
  :meth:`~saeray.run.records.Records.consolidate` at the end; really written to a local temporary
  folder through a byte-counting :class:`~saeray.store.Store`, consolidate included.
* ``manifest_rewrite`` (the OLD policy, re-enacted here only to measure it): after each unit,
  rewrite one JSON document holding every unit so far, as ``Store.write_json`` formats it. The
  bytes go through the same counting Store, but to a sink that keeps nothing: at N = 3 000 the old
  policy writes ~63 GB, which would take longer than the bench and fill the disk. Each document is
  byte-identical to what ``write_json`` would write (checked here for the first ones), so the
  count is exact.

The ratio bytes(3 000) / bytes(300) tells the growth: ~10 is linear, ~100 quadratic.

**S3 write amplification** — bytes sent to S3 per byte of data, counted by a botocore handler on
the s3fs client (PutObject and UploadPart bodies; CopyObject / UploadPartCopy count the bytes the
copy writes server-side, known from what was written to the source). A set of Parquet-sized files
(20 x 1 MiB, 2 x 64 MiB: the latter go as multipart uploads) is written to a moto S3 server on
127.0.0.1 through :meth:`Store.open_write` (target 1.0), and again with the OLD policy re-enacted
here: write to a hidden temporary key, then ``fs.mv`` to the final key (a server-side copy + delete:
2.0).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import InputError
from ..run.records import Records
from ..store import Store
from .s3local import moto_server

MiB = 2**20
SITES = ("resid_post", "attn_out", "mlp_out")


@dataclass
class StoreBenchConfig:
    units: tuple[int, ...] = (300, 3000)
    hookpoints: int = 72                                  # a 24-layer model x 3 sites
    s3: bool = True
    s3_files: tuple[tuple[int, int], ...] = ((20, MiB), (2, 64 * MiB))   # (count, bytes each)
    workdir: str | None = None


def parse_s3_files(text: str) -> tuple[tuple[int, int], ...]:
    """``"20x1,2x64"`` -> ((20, 1 MiB), (2, 64 MiB)); sizes in MiB, fractions allowed."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)", item)
        if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
            raise InputError(f"--s3-files: {item!r} is not COUNTxMiB (e.g. 20x1,2x64)")
        out.append((int(m.group(1)), int(float(m.group(2)) * MiB)))
    if not out:
        raise InputError("--s3-files: empty; give a comma list of COUNTxMiB, e.g. 20x1,2x64")
    return tuple(out)


# -- counting what goes through the Store ----------------------------------------------------------
class _CountingFile:
    """Counts the bytes handed to a Store writer; forwards them unless ``f`` is None (a sink)."""

    def __init__(self, f: Any, store: "CountingStore"):
        self._f, self._store = f, store

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._store.bytes_written += n
        if self._f is not None:
            self._f.write(data)
        return n


class CountingStore(Store):
    """A Store that counts the bytes and files its writers produce. ``persist=False``: a sink
    (counted, not kept), for a policy whose output would not fit in the time or the disk."""

    persist = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bytes_written = 0
        self.files_written = 0

    @contextmanager
    def open_write(self, rel: str) -> Iterator[Any]:
        if self.persist:
            with super().open_write(rel) as f:
                yield _CountingFile(f, self)
        else:
            yield _CountingFile(None, self)
        self.files_written += 1


def counting_store(folder: str, persist: bool = True) -> CountingStore:
    st = CountingStore(os.path.abspath(folder))
    st.persist = persist
    return st


# -- record bytes ---------------------------------------------------------------------------------
def hookpoints(n: int) -> list[str]:
    return [f"{SITES[i % len(SITES)]}.{i // len(SITES)}" for i in range(n)]


def unit_name(i: int) -> str:
    return f"{i:05d}"


def unit_record(unit: str, hps: list[str]) -> dict:
    """Shaped like a harvest unit's record: one Parquet file per hook point."""
    return {"rows": 3592, "files": {hp: {"path": f"acts/{hp}/part-{unit}.parquet", "rows": 3592, "bytes": 930423,
                                         "sha256": hashlib.sha256(f"{unit}/{hp}".encode()).hexdigest()} for hp in hps}}


def records_policy(store: CountingStore, n: int, n_hookpoints: int) -> dict:
    """The current policy: one put per unit, one consolidate at the end."""
    hps = hookpoints(n_hookpoints)
    recs = Records(store, "harvest")
    t0 = time.perf_counter()
    per_put = []
    for i in range(n):
        before = store.bytes_written
        recs.put(unit_name(i), unit_record(unit_name(i), hps))
        per_put.append(store.bytes_written - before)
    puts = store.bytes_written
    loaded = recs.consolidate()
    if len(loaded) != n:  # pragma: no cover - a broken Records would make the figure meaningless
        raise RuntimeError(f"records: consolidate returned {len(loaded)} units, expected {n}")
    return {"bytes": store.bytes_written, "put_bytes": puts, "consolidate_bytes": store.bytes_written - puts,
            "files": store.files_written, "put_bytes_first": per_put[0], "put_bytes_last": per_put[-1],
            "wall_s": round(time.perf_counter() - t0, 3)}


def _entry(unit: str, record: dict) -> bytes:
    """One unit as it appears inside ``{"units": {...}}`` written by Store.write_json (indent=1, depth 2)."""
    return (f"  {json.dumps(unit)}: " + json.dumps(record, indent=1, default=str).replace("\n", "\n  ")).encode()


def manifest_rewrite_policy(store: CountingStore, n: int, n_hookpoints: int) -> dict:
    """The OLD policy, re-enacted: after each unit, rewrite ``{"units": {every unit so far}}``.

    The document after unit i is built from the units' serialized entries (each serialized once)
    instead of by ``json.dumps`` of the whole dict, which would cost minutes of CPU at N = 3 000;
    it is byte-identical to ``write_json``'s output, checked for the first three documents."""
    hps = hookpoints(n_hookpoints)
    head, tail = b'{\n "units": {\n', b"\n }\n}\n"
    body = bytearray()
    t0 = time.perf_counter()
    for i in range(n):
        if body:
            body += b",\n"
        body += _entry(unit_name(i), unit_record(unit_name(i), hps))
        if i < 3:
            want = json.dumps({"units": {unit_name(j): unit_record(unit_name(j), hps) for j in range(i + 1)}},
                              indent=1, default=str) + "\n"
            if head + body + tail != want.encode():  # pragma: no cover - guards the figure
                raise RuntimeError("manifest_rewrite: re-enacted document differs from Store.write_json's")
        with store.open_write("manifest.json") as f:
            f.write(head)
            f.write(memoryview(body))
            f.write(tail)
    return {"bytes": store.bytes_written, "files": store.files_written, "last_document_bytes": len(head) + len(body) + len(tail),
            "wall_s": round(time.perf_counter() - t0, 3)}


def record_bytes(cfg: StoreBenchConfig, work: str) -> dict:
    out: dict[str, Any] = {"hookpoints": cfg.hookpoints, "units": list(cfg.units), "records": {}, "manifest_rewrite": {}}
    for n in cfg.units:
        folder = os.path.join(work, f"records-{n}")
        out["records"][str(n)] = records_policy(counting_store(folder), n, cfg.hookpoints)
        shutil.rmtree(folder, ignore_errors=True)
        out["manifest_rewrite"][str(n)] = manifest_rewrite_policy(counting_store(os.path.join(work, f"old-{n}"), persist=False),
                                                                  n, cfg.hookpoints)
    if len(cfg.units) >= 2:
        lo, hi = str(cfg.units[0]), str(cfg.units[-1])
        out["n_ratio"] = cfg.units[-1] / cfg.units[0]
        for policy in ("records", "manifest_rewrite"):
            out[f"{policy}_ratio"] = round(out[policy][hi]["bytes"] / out[policy][lo]["bytes"], 2)
    return out


# -- S3 write amplification ------------------------------------------------------------------------
def _body_len(body) -> int:
    """Bytes a request body will send: bytes-like, or a file-like (botocore may have wrapped the
    bytes already) measured from its position to its end without consuming it."""
    if body is None:
        return 0
    if isinstance(body, (bytes, bytearray, memoryview)):
        return memoryview(body).nbytes
    pos = body.tell()
    end = body.seek(0, 2)
    body.seek(pos)
    return end - pos


class S3Meter:
    """Bytes each S3 call sends (or makes S3 write, for copies), from botocore's
    ``before-parameter-build`` event on the s3fs client: one count per API call."""

    def __init__(self, fs):
        self.client = fs.s3          # connects; s3fs makes every request through this client
        self.fs = fs
        self.by_op: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.written: dict[str, int] = {}   # key -> bytes sent to it: the size a copy of it writes
        self.client.meta.events.register("before-parameter-build.s3", self._on_call)

    def _on_call(self, params: dict, model, **_: Any) -> None:
        op = model.name
        self.calls[op] = self.calls.get(op, 0) + 1
        if op in ("PutObject", "UploadPart"):
            n = _body_len(params.get("Body"))
            key = f"{params['Bucket']}/{params['Key']}"
            self.written[key] = self.written.get(key, 0) + n
        elif op == "CopyObject":
            src = params["CopySource"]
            n = self.written[f"{src['Bucket']}/{src['Key']}"] if isinstance(src, dict) else self.written[src.lstrip("/")]
        elif op == "UploadPartCopy":
            first, last = map(int, params["CopySourceRange"].removeprefix("bytes=").split("-"))
            n = last - first + 1
        else:
            return
        self.by_op[op] = self.by_op.get(op, 0) + n

    @property
    def total(self) -> int:
        if self.fs.s3 is not self.client:  # pragma: no cover - s3fs reconnected: later calls were not seen
            raise RuntimeError("s3fs replaced its client during the measurement; the byte count is incomplete")
        return sum(self.by_op.values())


def _write_file(f, size: int, chunk: bytes) -> None:
    left = size
    while left:
        n = min(left, len(chunk))
        f.write(chunk[:n])
        left -= n


@contextmanager
def _old_policy_writer(st: Store, rel: str) -> Iterator[Any]:
    """The OLD store write, re-enacted for comparison: a hidden temporary key, then a rename,
    which on S3 is a server-side copy + delete."""
    final = st.path(rel)
    d, _, name = final.rpartition("/")
    tmp = f"{d}/.tmp-{uuid.uuid4().hex[:12]}-{name}"
    with st.fs.open(tmp, "wb") as f:
        yield f
    st.fs.mv(tmp, final)


def s3_amplification(cfg: StoreBenchConfig) -> dict:
    chunk = os.urandom(8 * MiB)  # incompressible, like float16 activations
    sizes = [size for count, size in cfg.s3_files for _ in range(count)]
    out: dict[str, Any] = {"files": len(sizes), "data_bytes": sum(sizes)}
    with moto_server():
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        for policy, writer in (("store", Store.open_write), ("old_tmp_then_mv", _old_policy_writer)):
            st = Store.open(f"s3://{bucket}/{policy}")
            if policy == "store":  # a plain CreateBucket: fs.mkdir sends a location constraint moto refuses for us-east-1
                st.fs.call_s3("create_bucket", Bucket=bucket)
            meter = S3Meter(st.fs)
            t0 = time.perf_counter()
            for i, size in enumerate(sizes):
                with writer(st, f"acts/h/part-{i:05d}.parquet") as f:
                    _write_file(f, size, chunk)
            wall = time.perf_counter() - t0
            landed = sum(st.size(f"acts/h/{n}") for n in st.ls("acts/h"))
            if landed != out["data_bytes"]:  # pragma: no cover - guards the figure
                raise RuntimeError(f"s3 bench ({policy}): {landed} bytes landed, {out['data_bytes']} written")
            out[policy] = {"s3_bytes": meter.total, "s3_bytes_per_data_byte": round(meter.total / out["data_bytes"], 4),
                           "bytes_by_call": dict(meter.by_op), "calls": dict(sorted(meter.calls.items())),
                           "wall_s": round(wall, 2)}
    out["s3_bytes_per_data_byte"] = out["store"]["s3_bytes_per_data_byte"]
    return out


def harvest_amplification(work: str, docs: int = 96, unit_contexts: int = 32) -> dict:
    """The harvest's own write path to S3: a random-init 4-layer GPT-NeoX (d 128, the storyworld
    tokenizer) on storyworld contexts, through the model pool's worker and harvest job in this
    process (the same objects the pool's actors hold; in-process so one meter sees every request),
    each unit's four hook-point files then its record, records consolidated at the end. Returns
    bytes sent to S3 per byte of activation files, and per byte of everything (records included)."""
    from ..harvest.corpus import Corpus, Units
    from ..harvest.job import HarvestJob
    from ..models.pool import Load, PoolWorker
    from ..models.random_init import save_random_model
    from ..spec import CorpusSpec
    from ..storyworld.tokenizer import build_tokenizer, save_tokenizer, vocab_size

    model = os.path.join(work, "neox")
    save_random_model(model, "gpt_neox", n_layers=4, d_model=128, n_heads=4, vocab_size=vocab_size(), n_ctx=128)
    save_tokenizer(model)
    hps = [f"resid_post.{i}" for i in range(4)]
    corpus = Corpus(CorpusSpec(n_docs=docs, context_len=128), build_tokenizer())
    units = Units(docs, unit_contexts)
    with moto_server():
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        st = Store.open(f"s3://{bucket}/run/targets/neox@main")
        st.fs.call_s3("create_bucket", Bucket=bucket)
        meter = S3Meter(st.fs)
        worker = PoolWorker(Load(model, threads=1), (0, 4), HarvestJob,
                            {"hookpoints": hps, "widths": {h: 128 for h in hps}, "store": st,
                             "act_dtype": "float16", "meta": {"model": "neox", "revision": "main"}})
        records = Records(st, "harvest")
        for u in range(units.count):
            name = Units.name(u)
            c = corpus.contexts(*units.bounds(u))
            worker.begin(name)
            for a in range(0, len(c), 16):
                b = c.slice(a, a + 16)
                worker.forward(name, 0, b.ids, {"doc": b.doc, "ids": b.ids, "keep": b.keep})
            records.put(name, {"rows": c.rows(), "files": worker.finish(name)})
        recs = records.consolidate()
        act_bytes = sum(f["bytes"] for r in recs.values() for f in r["files"].values())
        total = meter.total
    return {"units": units.count, "files": units.count * len(hps), "act_bytes": act_bytes, "s3_bytes": total,
            "s3_bytes_per_act_byte": round(total / act_bytes, 4), "bytes_by_call": dict(meter.by_op),
            "calls": dict(sorted(meter.calls.items()))}


# -- the bench --------------------------------------------------------------------------------------
def run_bench(cfg: StoreBenchConfig) -> dict:
    work = cfg.workdir or tempfile.mkdtemp(prefix="saeray-bench-store-")
    os.makedirs(work, exist_ok=True)
    try:
        res: dict[str, Any] = {"bench": "store", "record_bytes": record_bytes(cfg, work)}
        if cfg.s3:
            res["s3"] = s3_amplification(cfg)
            res["harvest_s3"] = harvest_amplification(work)
        return res
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


def render(res: dict) -> str:
    rb = res["record_bytes"]
    lines = [f"record bytes: bytes written to record N finished units ({rb['hookpoints']} hook points per unit)",
             f"  {'N':>7}  {'records (put + consolidate)':>28}  {'manifest_rewrite (OLD policy)':>30}"]
    for n in rb["units"]:
        r, m = rb["records"][str(n)], rb["manifest_rewrite"][str(n)]
        lines.append(f"  {n:>7}  {_mb(r['bytes']):>28}  {_mb(m['bytes']):>30}")
    if "n_ratio" in rb:
        lines.append(f"  {'ratio':>7}  {rb['records_ratio']:>28}  {rb['manifest_rewrite_ratio']:>30}"
                     f"   (N ratio {rb['n_ratio']:g}: ~{rb['n_ratio']:g} linear, ~{rb['n_ratio'] ** 2:g} quadratic)")
    if "s3" in res:
        s3 = res["s3"]
        lines.append(f"S3 write amplification: {s3['files']} files, {_mb(s3['data_bytes'])} of data, moto on 127.0.0.1")
        for policy, label in (("store", "Store.open_write (direct to key)"), ("old_tmp_then_mv", "OLD: temp key + mv (copy)")):
            p = s3[policy]
            by = ", ".join(f"{k} {_mb(v)}" for k, v in p["bytes_by_call"].items())
            lines.append(f"  {label:<34} {p['s3_bytes_per_data_byte']:.3f} bytes sent per data byte   ({by})")
    if "harvest_s3" in res:
        h = res["harvest_s3"]
        lines.append(f"harvest to S3 ({h['units']} units, {h['files']} activation files, {_mb(h['act_bytes'])}): "
                     f"{h['s3_bytes_per_act_byte']:.4f} bytes sent per activation byte (records included)")
    return "\n".join(lines)

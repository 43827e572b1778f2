"""The ``presence`` stage: how well each concept is read from each hook point of one target (one
model at one checkpoint), by every SAE's best latent and k-sparse probes, beside a linear probe on
the same activations (:mod:`saeray.evaluate.probes`).

It runs for specs with ``emergence`` (whose analysis reads one chosen SAE, :func:`choose_sae`)
and for every audit of a storyworld corpus with SAEs and ``evaluation.concepts`` (the report's
planted-concept recovery section, :mod:`saeray.report.concepts`); without an emergence section
it uses :class:`~saeray.spec.EmergenceSpec`'s defaults (storyworld concepts, ``probe_k``,
``max_tokens``).

Held-out contexts go once through the model pool, which captures every hook point; each hook
point is then scored by its own Ray task: the linear probe once, then each SAE of the spec in
turn (its latents, best latent, k-sparse probes). Contexts alternate between the probes' train
and test splits, so both see every topic. One Parquet file per hook point,
``<target>/emergence/presence/<hookpoint>.parquet``, written before its record
(``_records/presence``): a re-run scores only the hook points without one. Rows: one per (SAE,
concept, measure, k); the linear probe's rows (``measure`` "linear", ``k`` 0) read the raw
activations, so their ``sae`` is null.

Concepts: storyworld's planted labels (the same as the evaluate stage's), or the spec's word lists:
a token is in a concept when it is one of the concept's words (words the tokenizer splits into
several tokens cannot be a token's label and are refused by the check).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import InputError, SaerayError
from ..run.records import Records
from ..run.stages import Result, Stage, TargetContext

log = logging.getLogger("saeray")

MIN_POSITIVES = 10      # per split: fewer positives than this and a concept is not scored at that target
# sae: the variant name (train.unit.variant_name) of latent/sparse rows; null for the linear probe
SCHEMA = pa.schema([("hookpoint", pa.string()), ("layer", pa.int32()), ("sae", pa.string()), ("concept", pa.string()),
                    ("measure", pa.string()), ("k", pa.int32()), ("auroc", pa.float64()), ("f1", pa.float64()),
                    ("latents", pa.list_(pa.int32())), ("positives_train", pa.int32()), ("positives_test", pa.int32())])


@dataclass
class PresenceResult(Result):
    saes: list = field(default_factory=list)        # the variants scored, in sae.architectures order
    hookpoints: list = field(default_factory=list)
    concepts: list = field(default_factory=list)
    tokens: int = 0


# ---- concepts -----------------------------------------------------------------------------------

def word_token_ids(tokenizer, words: list[str]) -> tuple[set[int], list[str]]:
    """Token ids of the words that are one known token (with or without a leading space); the rest."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: set[int] = set()
    split: list[str] = []
    for w in words:
        found = False
        for form in (w, " " + w):
            t = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(t) == 1 and t[0] != unk:
                ids.add(int(t[0]))
                found = True
        if not found:
            split.append(w)
    return ids, split


def settings(spec):
    """The emergence section, or its defaults when the spec has none (storyworld concepts)."""
    from ..spec import EmergenceSpec

    return spec.emergence if spec.emergence is not None else EmergenceSpec()


def labels(spec, contexts, tokenizer) -> tuple[list[str], np.ndarray]:
    """Concept names and a bool matrix [kept rows, concepts], rows in ``contexts.keep`` order."""
    em = settings(spec)
    if em.concepts == "storyworld":
        from ..evaluate.concepts import storyworld_concepts

        return storyworld_concepts(contexts, spec.corpus.seed)
    tokens = contexts.ids[contexts.keep]
    names, cols = [], []
    for name, words in em.concepts.items():
        ids, _ = word_token_ids(tokenizer, words)
        names.append(name)
        cols.append(np.isin(tokens, list(ids)))
    return names, np.stack(cols, 1)


def _cap(contexts, max_tokens: int):
    """The leading contexts whose kept tokens fit in ``max_tokens`` (at least two, one per split)."""
    cum = np.cumsum(contexts.keep.sum(1))
    n = max(2, int(np.searchsorted(cum, max_tokens, side="right")))
    return contexts.slice(0, min(n, len(contexts)))


# ---- the stage ----------------------------------------------------------------------------------

def sae_names(spec) -> list[str]:
    """Every SAE variant of the spec, in ``sae.architectures`` order (what presence scores)."""
    from ..train.unit import variant_name, variants_from_spec

    return [variant_name(v) for v in variants_from_spec(spec.sae)]


def choose_sae(spec) -> str:
    """The variant name the emergence analysis reads: ``emergence.sae`` as a name or an
    architecture (default, and without an emergence section: the first variant)."""
    names = sae_names(spec)
    want = spec.emergence.sae if spec.emergence is not None else None
    if want is None:
        return names[0]
    if want in names:
        return want
    by_arch = [n for n, a in zip(names, spec.sae.architectures) if a.arch == want]
    if not by_arch:
        raise InputError(f"emergence.sae: '{want}' is neither a variant ({', '.join(names)}) nor an architecture "
                         "of sae.architectures; name one of them")
    return by_arch[0]


def key(spec, target) -> dict:
    """The SAEs (train's key) and what the scores depend on: the concepts, the probes' k and the
    held-out tokens. From the emergence section, or its defaults without one (so adding an
    emergence section with default settings reuses a finished presence). ``emergence.sae`` is not
    in it: every SAE is scored, the analysis picks one."""
    from ..train.stage import key as train_key

    em = settings(spec).model_dump(mode="json")
    kept = {f"emergence.{k}": em[k] for k in ("concepts", "probe_k", "max_tokens")}
    return {**train_key(spec, target), **kept, "corpus.heldout_docs": spec.corpus.heldout_docs}


def check(spec, targets) -> None:
    from ..harvest.corpus import corpus_for
    from .thresholds import step_of

    em = spec.emergence
    if spec.sae is None:
        raise InputError(f"{'emergence' if em is not None else 'presence'}: needs SAEs; add an sae section (e.g. "
                         "sae: {architectures: [{arch: topk, width: 512, k: 16}]})")
    if em is None:
        # concept recovery of a plain audit: storyworld's planted labels
        if spec.corpus.source != "storyworld":
            raise InputError("presence: without an emergence section the concepts are storyworld's planted labels, "
                             "which need corpus.source: storyworld; add an emergence section with word lists "
                             "(emergence: {concepts: {concept: [words]}})")
        if spec.corpus.heldout_docs < 1:
            raise InputError("corpus.heldout_docs: presence scores concepts on held-out documents; set some (e.g. 256)")
        return
    choose_sae(spec)
    if spec.corpus.heldout_docs < 4:
        raise InputError("corpus.heldout_docs: emergence scores concepts on held-out documents; set at least 4 "
                         "(e.g. 256)")
    for i, m in enumerate(spec.models):
        revs = [t.revision for t in targets if t.model == m.name]
        where = f"model[{i}].revisions" if len(spec.models) > 1 else "model.revisions"
        bad = [r for r in revs if r != "main" and step_of(r) is None]
        if bad:
            raise InputError(f"{where}: emergence orders checkpoints by their step; '{bad[0]}' is not step<N> "
                             "(or main, counted last)")
        if "step0" not in revs:
            raise InputError(f"{where}: emergence needs step0 (the random initialisation) of {m.name} as the "
                             "control for concepts a random network already reads; add step0")
    for t in targets:
        tok = t.ref.tokenizer()
        corpus = corpus_for(spec.corpus, tok)
        if em.concepts == "storyworld":
            if not corpus.is_storyworld:
                raise InputError("emergence.concepts: 'storyworld' labels need corpus.source: storyworld; give word "
                                 "lists instead ({concept: [words]})")
            continue
        for name, words in em.concepts.items():
            ids, split = word_token_ids(tok, words)
            if split:
                raise InputError(f"emergence.concepts.{name}: {', '.join(repr(w) for w in split[:5])} "
                                 f"{'is' if len(split) == 1 else 'are'} not one known token for {t} (split into "
                                 "several, or out of the vocabulary); list single-token words only")


class ActsJob:
    """Model-pool job: the kept positions' activations at this stage's hook points, as float16."""

    logits = False
    grad = False

    def __init__(self, stage, device: torch.device, hookpoints: list[str]):
        self.hookpoints = hookpoints

    def begin(self, item: str) -> None:
        self.acts: dict[str, list[np.ndarray]] = {hp: [] for hp in self.hookpoints}

    def capture(self, payload: dict) -> list[str]:
        return self.hookpoints

    def interventions(self, payload: dict):
        return None

    def on_acts(self, payload: dict, acts: dict[str, torch.Tensor]) -> None:
        keep = torch.from_numpy(np.array(payload["keep"]))
        for hp in self.hookpoints:
            self.acts[hp].append(acts[hp][keep.to(acts[hp].device)].to(torch.float16).cpu().numpy())

    def on_output(self, payload: dict, output: torch.Tensor) -> None:
        return None

    def finish(self, item: str) -> dict[str, np.ndarray]:
        return {hp: np.concatenate(v) for hp, v in self.acts.items() if v}


def score_hookpoint(acts: np.ndarray, y: np.ndarray, train: np.ndarray, saes: dict[str, str], probe_k: list[int],
                    names: list[str], hookpoint: str, threads: int = 1) -> bytes:
    """Every measure for every concept at one hook point -> Parquet bytes (a Ray task's body):
    the linear probe on ``acts`` once, then each SAE of ``saes`` ({variant name: SAE folder URL},
    loaded one at a time) by its best latent and its k-sparse probes."""
    from ..evaluate import probes
    from ..models.hookpoints import parse
    from ..sae import io as sae_io

    torch.set_num_threads(max(1, threads))
    x = torch.tensor(acts, dtype=torch.float32)     # a copy: the object store hands out read-only arrays
    yt = torch.tensor(y)
    tr = torch.tensor(train)
    ok = (yt[tr].sum(0) >= MIN_POSITIVES) & (yt[~tr].sum(0) >= MIN_POSITIVES)
    cols = ok.nonzero().flatten()
    yk = yt[:, cols]
    rows = []
    if len(cols):
        ptr, pte = yk[tr].sum(0).tolist(), yk[~tr].sum(0).tolist()
        layer = parse(hookpoint).layer

        def add(sae: str | None, measure: str, k: int, r: dict) -> None:
            for j, c in enumerate(cols.tolist()):
                rows.append({"hookpoint": hookpoint, "layer": layer, "sae": sae, "concept": names[c],
                             "measure": measure, "k": k, "auroc": float(r["auroc"][j]), "f1": float(r["f1"][j]),
                             "latents": [int(v) for v in r["latents"][j]], "positives_train": int(ptr[j]),
                             "positives_test": int(pte[j])})

        add(None, "linear", 0, probes.linear_probe(probes.Split(x[tr], yk[tr], x[~tr], yk[~tr])))
        for name, url in saes.items():
            sae = sae_io.load(url, device="cpu")
            with torch.no_grad():
                lat = torch.cat([sae(x[i:i + 8192]).latents for i in range(0, len(x), 8192)]).float()
            del sae
            lsplit = probes.Split(lat[tr], yk[tr], lat[~tr], yk[~tr])
            add(name, "latent", 1, probes.best_latent(lsplit))
            for k in probe_k:
                add(name, "sparse", k, probes.sparse_probe(lsplit, k))
            del lat, lsplit
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def table_path(hookpoint: str) -> str:
    return f"emergence/presence/{hookpoint}.parquet"


def _with_sae(tab: pa.Table, sae: str | None) -> pa.Table:
    """A table in SCHEMA; one written before the ``sae`` column (one SAE per target) gets ``sae``
    on its latent and sparse rows."""
    if "sae" not in tab.column_names:
        col = [None if m == "linear" else sae for m in tab.column("measure").to_pylist()]
        tab = tab.append_column("sae", pa.array(col, pa.string()))
    return tab.select(SCHEMA.names).cast(SCHEMA)


def read_presence(store, hookpoints: list[str], sae: str | None = None) -> pa.Table:
    """The presence rows of ``hookpoints`` from a target's folder ``store`` (``sae``: the SAE of
    tables written without an ``sae`` column)."""
    parts = [_with_sae(pq.read_table(io.BytesIO(store.read_bytes(table_path(hp)))), sae) for hp in hookpoints]
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def run(ctx: TargetContext, inputs: dict) -> PresenceResult:
    import ray

    from ..harvest.corpus import corpus_for
    from ..harvest.stage import plan
    from ..models.pool import Item, Load, ModelPool
    from ..models.shard import route
    from ..progress import progress

    spec, target, store = ctx.spec, ctx.target, ctx.store
    em = settings(spec)
    variants = sae_names(spec)
    saes = {hp: {n: d[n] for n in variants if n in d} for hp, d in inputs["train"].saes.items()}
    p = plan(spec, target)
    hps = [hp for hp in p.hookpoints if hp in saes]
    tok = target.ref.tokenizer()
    c = _cap(corpus_for(spec.corpus, tok).heldout(), em.max_tokens)
    names, Y = labels(spec, c, tok)
    # alternate contexts between the probes' train and test splits
    train = np.repeat(np.arange(len(c)) % 2 == 0, c.keep.sum(1))
    records = Records(store, "presence")
    todo = [hp for hp in hps if hp not in records.names()]
    log.info(f"presence {target}: {len(todo)} of {len(hps)} hook points to score ({len(variants)} SAEs), "
             f"{len(names)} concepts, "
             f"{int(c.keep.sum())} held-out tokens")
    if todo:
        acts: dict[str, list] = {hp: [] for hp in todo}
        B = spec.evaluation.batch_size
        slices = [slice(a, min(a + B, len(c))) for a in range(0, len(c), B)]
        got: dict[str, dict] = {}

        def on_item(key: str, parts: list[dict]) -> None:
            got[key] = {hp: a for part in parts for hp, a in part.items()}

        def batches(sl: slice):
            yield c.ids[sl], {"keep": c.keep[sl]}, "acts"

        per_stage = route(todo, p.ranges, p.n_layers, p.n_heads)
        res = spec.resources.eval
        with ModelPool(Load.of(target.ref, res), p.ranges, ActsJob, [{"hookpoints": st} for st in per_stage],
                       replicas=1, resources=res.ray_options(), name=f"presence {target}") as pool:
            pool.run([Item(f"b{i:05d}", lambda sl=sl: batches(sl)) for i, sl in enumerate(slices)], on_item)
        for k in sorted(got):
            for hp, a in got[k].items():
                acts[hp].append(a)
        task = ray.remote(score_hookpoint).options(**res.task_options())
        y_ref, train_ref = ray.put(Y), ray.put(train)
        pending = {task.remote(ray.put(np.concatenate(acts[hp])), y_ref, train_ref,
                               {n: store.url_of(d["path"]) for n, d in saes[hp].items()},
                               em.probe_k, names, hp, max(1, int(res.num_cpus))): hp for hp in todo}
        with progress(f"presence {target}", total=len(pending), unit="hook point") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                hp = pending.pop(ready[0])
                store.write_bytes(table_path(hp), ray.get(ready[0]))
                records.put(hp, {"saes": list(saes[hp]), "concepts": len(names)})
                bar.advance(1)
        records.consolidate()
    missing = [hp for hp in hps if not store.exists(table_path(hp))]
    if missing:
        raise SaerayError(f"presence {target}: tables missing for {', '.join(missing)}")
    return PresenceResult([n for n in variants if any(n in saes[hp] for hp in hps)], hps, names, int(c.keep.sum()))


STAGE = Stage("presence", needs=("train",), key=key, check=check, run=run, result=PresenceResult)

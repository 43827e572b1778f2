"""The look-up sweep's grid and tables: work items, their results as Parquet, and the figures.

Items (one Ray work item each, the resume granularity): ``<set>@L<layer>@<batch>`` for every neuron
set (``top``, ``random``, ``copy``), chosen layer and batch of ``neurons_per_item`` neurons, plus one
``induction`` item (every head's induction score). Written per item, under
``<target>/sweeps/<sweep>/``::

    neurons/<item>.parquet          one row per neuron: token, congruence, top upstream head
    activating/<item>.parquet       one row per (neuron, prompt): split, activation, trimmed text, active heads
    pairs/<item>.parquet            one row per (neuron, head) pair worth explaining
    ablation/<item>.parquet         one row per (pair, prompt): head active?, change of the token's probability
    explanations/<item>.parquet     one row per pair: explanation, balanced accuracy on held-out prompts
    classifications/<item>.parquet  one row per (pair, held-out prompt): truth, the classifier's answer
    induction/induction.parquet     one row per head: induction scores
    delphi/explanations/<latent>.txt, delphi/scores/detection/<latent>.txt   (delphi's layout)

The first four come from the model pool (records ``_records/items``), the explanations from the
explaining step (records ``_records/explained``); each record is written after its files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .agreement import nanmean

_KEY = [("target", pa.string()), ("set", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32())]
_HEAD = [("head_layer", pa.int32()), ("head", pa.int32())]
SCHEMAS = {
    "neurons": pa.schema(_KEY + [("token", pa.string()), ("token_id", pa.int32()), ("congruence", pa.float64()),
                                 ("n_explain", pa.int32()), ("n_test", pa.int32()), ("n_pairs", pa.int32()),
                                 ("top_head_layer", pa.int32()), ("top_head", pa.int32())]),
    "activating": pa.schema(_KEY + [("split", pa.string()), ("rank", pa.int32()), ("context", pa.int64()),
                                    ("position", pa.int32()), ("activation", pa.float64()),
                                    ("trimmed_activation", pa.float64()), ("start", pa.int32()),
                                    ("tokens", pa.list_(pa.string())), ("text", pa.string()),
                                    ("active_heads", pa.list_(pa.int32())), ("head_scores", pa.list_(pa.float32()))]),
    "pairs": pa.schema(_KEY + [("token", pa.string())] + _HEAD + [("share", pa.float64())]),
    "ablation": pa.schema(_KEY + _HEAD + [("split", pa.string()), ("rank", pa.int32()), ("active", pa.bool_()),
                                          ("effect", pa.float64())]),
    "explanations": pa.schema(_KEY + [("token", pa.string())] + _HEAD + [
        ("explainer", pa.string()), ("explanation", pa.string()), ("n_active", pa.int32()), ("n_inactive", pa.int32()),
        ("n_test", pa.int32()), ("n_test_active", pa.int32()), ("score", pa.float64()), ("tp", pa.int32()),
        ("fn", pa.int32()), ("tn", pa.int32()), ("fp", pa.int32()), ("unparsed", pa.int32()), ("skipped", pa.string())]),
    "classifications": pa.schema(_KEY + _HEAD + [("rank", pa.int32()), ("truth", pa.bool_()), ("answer", pa.string()),
                                                 ("prediction", pa.bool_())]),
    "induction": pa.schema([("target", pa.string()), ("head_layer", pa.int32()), ("head", pa.int32()),
                            ("induction_random", pa.float64()), ("induction_docs", pa.float64())]),
}
SETS = ("top", "random", "copy")


@dataclass(frozen=True)
class LookupItem:
    set: str            # "top" | "random" | "copy" | "induction"
    layer: int = -1
    batch: int = 0

    @property
    def id(self) -> str:
        return "induction" if self.set == "induction" else f"{self.set}@L{self.layer:02d}@{self.batch:03d}"


def default_layers(n_layers: int) -> list[int]:
    """The paper looks at the last layers; layer 0 has no earlier heads to attribute to."""
    return [l for l in range(max(1, n_layers - 3), n_layers)]


def items_for(opt, layers: list[int], copy: bool) -> list[LookupItem]:
    sizes = {"top": opt.n_per_layer, "random": opt.n_random, "copy": opt.n_per_layer if copy else 0}
    out = [LookupItem("induction")]
    for s in SETS:
        for L in layers:
            out += [LookupItem(s, L, b) for b in range(math.ceil(sizes[s] / opt.neurons_per_item))]
    return out


def payload(opt, item: LookupItem, storyworld_seed: int | None, bos: int | None, vocab: tuple[int, int] | None,
            contexts=None) -> dict:
    """What the pool job gets for one item; ``contexts``: the corpus contexts (or their object ref)."""
    if item.set == "induction":
        return {"kind": "induction", "args": {"bos": bos, "vocab": vocab, "storyworld_seed": storyworld_seed,
                                              "seq_len": 8 if storyworld_seed is not None else 32}}
    from .lookups import ItemOptions

    n = opt.n_random if item.set == "random" else opt.n_per_layer
    return {"kind": "neurons", "set": item.set, "layer": item.layer, "batch": item.batch, "n": n,
            "per_item": opt.neurons_per_item, "seed": 0, "contexts": contexts,
            "options": ItemOptions(n_prompts=opt.n_prompts, n_test=opt.n_test, max_prompt_len=opt.max_prompt_len,
                                   max_pairs=opt.max_pairs_per_neuron).to_dict()}


def example_text(tok, ids: list[int], token_id: int, bos: int | None) -> str:
    """A prompt as the explainer sees it: the trimmed prompt with the neuron's token appended,
    newlines as spaces (the authors' format)."""
    body = ids[1:] if bos is not None and ids and ids[0] == bos else ids
    return " ".join(tok.decode(list(body) + [token_id]).split())


def item_tables(target: str, result: list[dict], tok, bos: int | None) -> dict[str, pa.Table]:
    cols = {k: {f.name: [] for f in s} for k, s in SCHEMAS.items() if k in ("neurons", "activating", "pairs", "ablation")}

    def add(table: str, **row) -> None:
        for k, v in row.items():
            cols[table][k].append(v)

    for n in result:
        key = dict(target=target, set=n["set"], layer=n["layer"], neuron=n["index"])
        ps = n["prompts"]
        th = n["top_head"] or (None, None)
        add("neurons", **key, token=n["token"], token_id=n["token_id"], congruence=n["congruence"],
            n_explain=sum(p["split"] == "explain" for p in ps), n_test=sum(p["split"] == "test" for p in ps),
            n_pairs=len(n["pairs"]), top_head_layer=th[0], top_head=th[1])
        rank = {"explain": 0, "test": 0}
        for p in ps:
            p["rank"] = rank[p["split"]]
            rank[p["split"]] += 1
            add("activating", **key, split=p["split"], rank=p["rank"], context=p["context"], position=p["position"],
                activation=p["activation"], trimmed_activation=p["trimmed_activation"], start=p["start"],
                tokens=[tok.decode([t]) for t in p["ids"]], text=example_text(tok, p["ids"], n["token_id"], bos),
                active_heads=[i for i, a in enumerate(p["active"]) if a], head_scores=p["head_scores"])
        for k, pr in enumerate(n["pairs"]):
            add("pairs", **key, token=n["token"], head_layer=pr["head_layer"], head=pr["head"], share=pr["share"])
            flat = pr["head_layer"] * n["n_heads"] + pr["head"]
            for p in ps:
                add("ablation", **key, head_layer=pr["head_layer"], head=pr["head"], split=p["split"], rank=p["rank"],
                    active=bool(p["active"][flat]), effect=p["effects"][k])
    return {k: pa.table(v, schema=SCHEMAS[k]) for k, v in cols.items()}


def induction_table(target: str, res: dict) -> pa.Table:
    rnd = np.asarray(res["random"])
    docs = np.asarray(res["docs"]) if res["docs"] is not None else np.full(rnd.shape, np.nan)
    rows = [(target, l, h, float(rnd[l, h]), float(docs[l, h])) for l in range(rnd.shape[0]) for h in range(rnd.shape[1])]
    return pa.table(list(map(list, zip(*rows))), schema=SCHEMAS["induction"])


def delphi_files(rows: list[dict], classifications: list[dict]) -> dict[str, str]:
    """delphi's layout (wave2.md §3.2): ``explanations/<latent>.txt`` holds the explanation as a JSON
    string, ``scores/detection/<latent>.txt`` a JSON list of classifier outputs. A pair is named like
    a delphi latent, module ``mlp_post.<L>.head<l>.<h>`` and latent index the neuron, so delphi's
    ``<module>_latent<i>`` split reads it back."""
    out = {}
    for r in rows:
        latent = f"mlp_post.{r['layer']}.head{r['head_layer']}.{r['head']}_latent{r['neuron']}"
        if r["set"] != "top":
            latent = f"{r['set']}.{latent}"
        out[f"explanations/{latent}.txt"] = json.dumps(r["explanation"])
        mine = [c for c in classifications if (c["set"], c["layer"], c["neuron"], c["head_layer"], c["head"])
                == (r["set"], r["layer"], r["neuron"], r["head_layer"], r["head"])]
        out[f"scores/detection/{latent}.txt"] = json.dumps([
            {"str_tokens": c["tokens"], "activations": c["activations"], "distance": c["rank"],
             "activating": c["truth"], "prediction": c["prediction"], "probability": None,
             "correct": None if c["prediction"] is None else c["prediction"] == c["truth"]} for c in mine])
    return out


def summarize(tables: dict[str, pa.Table | None], top_induction: int) -> dict:
    """The figures, per neuron set: neurons, pairs, explanation scores, the ablation KS test, and
    for the copy-target neurons the induction match."""
    from .stats import ks_2samp

    out: dict = {}
    neu, expl, abl, ind = (tables.get(k) for k in ("neurons", "explanations", "ablation", "induction"))
    if neu is None:
        return out
    neu, expl = neu.to_pylist(), (expl.to_pylist() if expl is not None else [])
    abl = abl.to_pylist() if abl is not None else []
    for s in SETS:
        ns = [n for n in neu if n["set"] == s]
        if not ns:
            continue
        sc = [e["score"] for e in expl if e["set"] == s and e["skipped"] == ""]
        a = [r["effect"] for r in abl if r["set"] == s and r["active"]]
        b = [r["effect"] for r in abl if r["set"] == s and not r["active"]]
        ks = ks_2samp(a, b) if a and b else None
        fig = {"n_neurons": len(ns), "n_with_prompts": sum(n["n_explain"] > 0 for n in ns),
               "n_pairs": sum(n["n_pairs"] for n in ns), "n_scored": len(sc),
               "score_mean": nanmean(sc), "score_std": float(np.std(sc)) if sc else math.nan,
               "unparsed": sum(e["unparsed"] for e in expl if e["set"] == s),
               "classified": sum(e["n_test"] for e in expl if e["set"] == s and e["skipped"] == ""),
               "ks_d": ks.d if ks else math.nan, "ks_p": ks.p if ks else math.nan,
               "effect_active_mean": nanmean(a), "effect_inactive_mean": nanmean(b)}
        if s == "copy" and ind is not None:
            fig.update(induction_match(ns, ind.to_pylist(), top_induction))
        out[s] = fig
    return out


def top_heads(ind: list[dict], column: str, k: int) -> set[tuple[int, int]]:
    vals = [r for r in ind if r[column] is not None and not math.isnan(r[column])]
    return {(r["head_layer"], r["head"]) for r in sorted(vals, key=lambda r: -r[column])[:k]}


def induction_match(neurons: list[dict], ind: list[dict], k: int) -> dict:
    """Fraction of copy-target neurons (with prompts) whose top upstream head is among the model's
    ``k`` top induction heads, by each induction measurement."""
    ns = [n for n in neurons if n["n_explain"] > 0 and n["top_head_layer"] is not None]
    out = {"induction_top": k, "n_copy_neurons": len(ns)}
    for col, name in (("induction_random", "induction_match"), ("induction_docs", "induction_match_docs")):
        top = top_heads(ind, col, k)
        out[name] = (sum((n["top_head_layer"], n["top_head"]) in top for n in ns) / len(ns)) if ns and top else math.nan
        out[f"{name.replace('match', 'heads')}"] = sorted(top)
    return out

"""What changed between two runs (``saeray diff A B``): the newer run ``b`` against the older ``a``.

Targets are paired by model (their folders' model slug), and where a model has several revisions
in both runs, same revision first, then in order. For each SAE (hook point and variant name) of a
pair of targets:

* **metrics**: FVU, L0, CE loss recovered, KL and dead fraction in both runs and their delta;
* **features**: the two decoders matched by cosine, data-free, as Feature Flow matches features
  across layers and GBA's MCS compares dictionaries. A pair of features is *matched* when each is
  the other's nearest decoder direction and their cosine is at least ``threshold`` (mutual nearest
  neighbours: one-to-one, and cheap enough for wide SAEs, since it needs only each row's best
  match, computed in blocks). ``matched_share`` is matched pairs over ``b``'s width; ``born`` are
  ``b``'s features with no match, ``lost`` are ``a``'s; ``mcs`` is the mean over ``b``'s features
  of their best cosine in ``a`` (GBA's mean max cosine similarity); ``most_changed`` lists the
  matched pairs that turned most (lowest cosine) and, when both runs counted firings for their
  dashboards, the largest changes in firing density;
* **influential**: with a GradSAE sweep over the SAE in both runs, the ``top`` latents by mean
  |score| in each, and the share of ``b``'s that are matched to one of ``a``'s;
* **concepts** (runs with planted labels, the presence stage): per hook point, the concepts the
  linear probe reads and each SAE's best latent recovers (test AUROC >= the report's ``READ``),
  lost and gained.

A run compared with itself reports zero deltas, every feature matched at cosine 1 and no concept
lost: the test of this module's plumbing.
"""
from __future__ import annotations

import io
import logging
import math

import numpy as np

from ..emergence.matching import unit_rows
from ..errors import InputError
from ..manifest import stage_result
from ..report.summary import sae_rows
from ..store import Store

log = logging.getLogger("saeray")

METRICS = ("fvu", "l0", "ce_loss_recovered", "kl", "dead_frac")
MOST = 10          # rows in each "most changed" list
BLOCK = 2048       # decoder rows per block of the cosine matrix


def open_run_folder(url: str) -> tuple[Store, dict]:
    st = Store.open(url)
    if not st.exists("manifest.json"):
        raise InputError(f"{url}: no manifest.json, so this is not a saeray run folder; give <store>/<run name> (or "
                         "<store>/<series>/runs/<run name>) of a run started with `saeray audit`")
    return st, st.read_json("manifest.json")


# ---- pairing --------------------------------------------------------------------------------------

def _slug(tid: str) -> str:
    return tid.rsplit("@", 1)[0]


def pair_targets(ma: dict, mb: dict) -> list[tuple[str, str]]:
    """(target of a, target of b) per model present in both runs."""
    ta, tb = list(ma.get("targets", {})), list(mb.get("targets", {}))
    out = []
    for slug in dict.fromkeys(_slug(t) for t in tb):
        xa = [t for t in ta if _slug(t) == slug]
        xb = [t for t in tb if _slug(t) == slug]
        same = [t for t in xb if t in xa]
        for t in same:
            out.append((t, t))
        ra = [t for t in xa if t not in same]
        rb = [t for t in xb if t not in same]
        out += list(zip(ra, rb))
    return out


# ---- features ----------------------------------------------------------------------------------

def nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For unit rows ``a`` [n_a, d] and ``b`` [n_b, d]: each b row's nearest a row and its cosine,
    and each a row's nearest b row and its cosine (blocks of rows, never the whole matrix)."""
    best_b = np.empty(len(b), np.int64)
    cos_b = np.empty(len(b), np.float32)
    best_a = np.zeros(len(a), np.int64)
    cos_a = np.full(len(a), -np.inf, np.float32)
    for s in range(0, len(b), BLOCK):
        c = b[s:s + BLOCK] @ a.T                    # [block, n_a]
        best_b[s:s + BLOCK] = c.argmax(1)
        cos_b[s:s + BLOCK] = c.max(1)
        j = c.argmax(0)
        v = c[j, np.arange(c.shape[1])]
        better = v > cos_a
        best_a[better] = j[better] + s
        cos_a[better] = v[better]
    return best_b, cos_b, best_a, cos_a


def match_features(wa: np.ndarray, wb: np.ndarray, threshold: float, density_a=None,
                   density_b=None) -> tuple[dict, dict[int, int]]:
    """Decoder matching of two SAEs (rows = features; see the module doc): the figures, and the
    matched pairs as {feature of a: feature of b}."""
    # float32: a wide SAE's decoder in float64 would double the memory of every block for nothing
    ua, ub = unit_rows(wa, np.float32), unit_rows(wb, np.float32)
    if ua.shape[1] != ub.shape[1]:
        return {"comparable": False, "reason": f"input sizes differ ({ua.shape[1]} and {ub.shape[1]})"}, {}
    best_b, cos_b, best_a, cos_a = nearest(ua, ub)
    j = np.arange(len(ub))
    mutual = (best_a[best_b] == j) & (cos_b >= threshold)
    pairs = [(int(best_b[x]), int(x), float(cos_b[x])) for x in np.flatnonzero(mutual)]
    matched_a = {p[0] for p in pairs}
    out = {"comparable": True, "width_a": int(len(ua)), "width_b": int(len(ub)), "matched": len(pairs),
           "matched_share": len(pairs) / max(1, len(ub)), "mcs": float(cos_b.mean()),
           "born": int(len(ub) - len(pairs)), "lost": int(len(ua) - len(matched_a)),
           "most_changed": [{"a": a, "b": b, "cos": round(c, 4)} for a, b, c in sorted(pairs, key=lambda p: p[2])[:MOST]],
           "born_examples": [{"b": int(x), "best_a": int(best_b[x]), "cos": round(float(cos_b[x]), 4)}
                             for x in np.argsort(cos_b)[:MOST] if not mutual[x]],
           "lost_examples": [{"a": int(x), "best_b": int(best_a[x]), "cos": round(float(cos_a[x]), 4)}
                             for x in np.argsort(cos_a)[:MOST] if int(x) not in matched_a]}
    if density_a is not None and density_b is not None:
        eps = 1e-6
        ch = [(a, b, c, math.log10((density_b[b] + eps) / (density_a[a] + eps))) for a, b, c in pairs]
        out["most_changed_density"] = [{"a": a, "b": b, "cos": round(c, 4), "density_a": float(density_a[a]),
                                        "density_b": float(density_b[b]), "log10_ratio": round(r, 3)}
                                       for a, b, c, r in sorted(ch, key=lambda x: -abs(x[3]))[:MOST]]
    return out, {a: b for a, b, _ in pairs}


def read_decoder(target: Store, rel: str) -> np.ndarray:
    from safetensors.numpy import load

    t = load(target.read_bytes(f"{rel}/sae_weights.safetensors"))
    return t["W_dec"].astype(np.float32)


def _densities(target: Store, hp: str, sae: str):
    from ..dashboards.stage import folder

    rel = f"{folder(hp, sae)}/selection.json"
    if not target.exists(rel):
        return None
    sel = target.read_json(rel)
    if not sel.get("counts") or not sel.get("tokens"):
        return None
    return np.asarray(sel["counts"], np.float64) / sel["tokens"]


# ---- GradSAE and concepts ----------------------------------------------------------------------

def _gradsae_tables(target: Store, manifest_target: dict):
    from ..dashboards.stage import gradsae_latents

    res = stage_result(manifest_target, "sweeps") or {}
    out = []
    for name, sw in (res.get("sweeps") or {}).items():
        if sw.get("method", "gradsae") != "gradsae":
            continue
        try:
            out += gradsae_latents(target, [name])
        except Exception as e:  # noqa: BLE001 - a diff without influence beats none
            log.warning(f"diff: sweep {name} of {target.url} could not be read ({e})")
    return out


def _top_influential(tables, hp: str, sae: str, top: int) -> list[int] | None:
    from ..dashboards.stage import influence

    inf = influence(tables, hp, sae)
    if not inf:
        return None
    return [lat for lat, _ in sorted(inf.items(), key=lambda kv: (kv[1]["rank"], kv[0]))[:top]]


def _concept_sets(target: Store, manifest_target: dict) -> dict[tuple[str, str], set[str]] | None:
    """{(hook point, SAE name or "linear probe"): concepts recovered at test AUROC >= READ}."""
    from ..emergence.presence import read_presence
    from ..report.concepts import READ

    res = stage_result(manifest_target, "presence")
    if not res:
        return None
    tab = read_presence(target, res.get("hookpoints", [])).to_pylist()
    best: dict[tuple[str, str, str], float] = {}
    for r in tab:
        if r["measure"] not in ("linear", "latent") or r["auroc"] is None or r["auroc"] != r["auroc"]:
            continue
        where = (r["hookpoint"], "linear probe" if r["measure"] == "linear" else r["sae"])
        best[where + (r["concept"],)] = max(best.get(where + (r["concept"],), 0.0), r["auroc"])
    out: dict[tuple[str, str], set[str]] = {}
    for (hp, who, c), v in best.items():
        s = out.setdefault((hp, who), set())
        if v >= READ:
            s.add(c)
    return out


# ---- the diff ----------------------------------------------------------------------------------

def _delta(a, b):
    ok = lambda v: v is not None and isinstance(v, (int, float)) and v == v  # noqa: E731
    return {"a": a, "b": b, "delta": (b - a) if ok(a) and ok(b) else None}


def diff_runs(a: Store, b: Store, threshold: float = 0.7, top: int = 20,
              ma: dict | None = None, mb: dict | None = None) -> dict:
    ma = ma if ma is not None else a.read_json("manifest.json")
    mb = mb if mb is not None else b.read_json("manifest.json")
    rows_a = {(r["target"], r["hookpoint"], r["name"]): r for r in sae_rows(ma, a.url)}
    rows_b = {(r["target"], r["hookpoint"], r["name"]): r for r in sae_rows(mb, b.url)}
    pairs = pair_targets(ma, mb)
    out = {"a": {"run": ma.get("run"), "url": a.url, "targets": list(ma.get("targets", {}))},
           "b": {"run": mb.get("run"), "url": b.url, "targets": list(mb.get("targets", {}))},
           "threshold": threshold, "top": top, "targets": [],
           "unpaired": {"a": [t for t in ma.get("targets", {}) if t not in {p[0] for p in pairs}],
                        "b": [t for t in mb.get("targets", {}) if t not in {p[1] for p in pairs}]}}
    for ta, tb in pairs:
        sa, sb = a / ma["targets"][ta]["folder"], b / mb["targets"][tb]["folder"]
        ga, gb = _gradsae_tables(sa, ma["targets"][ta]), _gradsae_tables(sb, mb["targets"][tb])
        keys_a = [(hp, n) for (t, hp, n) in rows_a if t == ta]
        keys_b = [(hp, n) for (t, hp, n) in rows_b if t == tb]
        saes = []
        for hp, name in keys_b:
            if (hp, name) not in keys_a:
                continue
            ra, rb = rows_a[(ta, hp, name)], rows_b[(tb, hp, name)]
            row = {"hookpoint": hp, "sae": name, "arch": rb["arch"], "width": rb["width"],
                   "metrics": {m: _delta(ra.get(m), rb.get(m)) for m in METRICS}}
            tra = ma["targets"][ta]["stages"]["train"]["result"]["saes"][hp][name]
            trb = mb["targets"][tb]["stages"]["train"]["result"]["saes"][hp][name]
            row["features"], pairs_ab = match_features(read_decoder(sa, tra["path"]), read_decoder(sb, trb["path"]),
                                                       threshold, _densities(sa, hp, name), _densities(sb, hp, name))
            ia, ib = _top_influential(ga, hp, name, top), _top_influential(gb, hp, name, top)
            if ia is not None and ib is not None:
                inv = {v: k for k, v in pairs_ab.items()}
                set_a, set_b = set(ia), set(ib)
                kept = [x for x in ib if inv.get(x) in set_a]
                row["influential"] = {"top_a": ia, "top_b": ib, "kept": kept,
                                      "overlap": len(kept) / max(1, len(ib)),
                                      "entered": [x for x in ib if x not in kept],
                                      "left": [x for x in ia if pairs_ab.get(x) not in set_b]}
            saes.append(row)
        ca, cb = _concept_sets(sa, ma["targets"][ta]), _concept_sets(sb, mb["targets"][tb])
        concepts = None
        if ca is not None and cb is not None:
            concepts = []
            for where in cb:
                if where in ca:
                    lost, gained = sorted(ca[where] - cb[where]), sorted(cb[where] - ca[where])
                    concepts.append({"hookpoint": where[0], "by": where[1], "a": len(ca[where]), "b": len(cb[where]),
                                     "lost": lost, "gained": gained})
        out["targets"].append({"a": ta, "b": tb, "model": mb["targets"][tb]["model"],
                               "revision_a": ma["targets"][ta]["revision"], "revision_b": mb["targets"][tb]["revision"],
                               "saes": saes, "concepts": concepts,
                               "added": [f"{hp}/{n}" for hp, n in keys_b if (hp, n) not in keys_a],
                               "removed": [f"{hp}/{n}" for hp, n in keys_a if (hp, n) not in keys_b]})
    return out


def no_change(d: dict) -> bool:
    """Every metric delta zero, every feature matched, nothing lost or gained."""
    for t in d["targets"]:
        for s in t["saes"]:
            if any(v["delta"] not in (0, 0.0, None) for v in s["metrics"].values()):
                return False
            f = s["features"]
            if not f.get("comparable") or f["matched"] != f["width_b"] or f["born"] or f["lost"]:
                return False
            if "influential" in s and s["influential"]["overlap"] < 1:
                return False
        for c in t["concepts"] or []:
            if c["lost"] or c["gained"]:
                return False
        if t["added"] or t["removed"]:
            return False
    return True


# ---- for people -----------------------------------------------------------------------------

def render_text(d: dict) -> str:
    """The terminal view: one table per pair of targets, then concept changes."""
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=160, force_terminal=False, color_system=None)
    con.print(f"diff: {d['b']['run']} (b) against {d['a']['run']} (a); features matched at decoder cosine "
              f">= {d['threshold']}")
    for t in d["targets"]:
        tab = Table(title=f"{t['model']}: {t['revision_a']} -> {t['revision_b']}", title_justify="left")
        for c in ("hook point", "SAE", "FVU Δ", "L0 Δ", "CE rec. Δ", "KL Δ", "dead Δ", "matched", "MCS", "born",
                  "lost", "top-infl. kept"):
            tab.add_column(c, justify="left" if c in ("hook point", "SAE") else "right")
        for s in t["saes"]:
            m, f = s["metrics"], s["features"]
            delta = lambda k, nd=4: "–" if m[k]["delta"] is None else f"{m[k]['delta']:+.{nd}f}"  # noqa: E731
            inf = s.get("influential")
            tab.add_row(s["hookpoint"], s["sae"], delta("fvu"), delta("l0", 2), delta("ce_loss_recovered"),
                        delta("kl"), delta("dead_frac"),
                        f"{f['matched_share']:.1%}" if f.get("comparable") else "–",
                        f"{f['mcs']:.3f}" if f.get("comparable") else "–",
                        str(f.get("born", "–")), str(f.get("lost", "–")),
                        f"{inf['overlap']:.0%}" if inf else "–")
        con.print(tab)
        for c in t["concepts"] or []:
            if c["lost"] or c["gained"]:
                con.print(f"  concepts at {c['hookpoint']} by {c['by']}: lost {', '.join(c['lost']) or '–'}; "
                          f"gained {', '.join(c['gained']) or '–'}")
        for k in ("added", "removed"):
            if t[k]:
                con.print(f"  SAEs {k}: {', '.join(t[k])}")
    for side in ("a", "b"):
        if d["unpaired"][side]:
            con.print(f"targets only in {side}: {', '.join(d['unpaired'][side])}")
    if d.get("alerts"):
        con.print("ALERTS:")
        for a in d["alerts"]:
            con.print(f"  {a['message']}")
    return buf.getvalue()

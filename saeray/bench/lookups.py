"""``saeray bench lookups``: the context look-up sweep's figures (Neo, Cohen, Barez 2024) on an
audit's run, by default storyworld-4l with the offline rule explainer (jobs/storyworld.yaml, sweep
``lookups``; run first if the run lacks it).

Printed: next-token neurons looked up and (neuron, head) pairs kept, the mean explanation score
(balanced accuracy of the classifier on held-out prompts) of the next-token neurons and of the
random control neurons, the paper's ablation check (KS test between the change in the neuron's
token probability when the head is zeroed on prompts where it is active and where it is not), and
``induction_match``: the share of copy-target neurons (the nonce code words) whose top upstream
head is among the model's top induction heads (random repeated sequences; ``_docs``: the same
pattern on storyworld text).

On storyworld the bench also reads the planted labels the pipeline never sees: how many of the
copy-target neurons' prompts end right before a copied word (``copy_prompt_share``), and the
induction match over the neurons whose prompts mostly do (the neurons that copy).
"""
from __future__ import annotations

import math

TARGETS = {"explanation_score_mean": 0.7, "score_margin": 0.1, "induction_match": 0.8, "ks_p": 0.01}


def _copy_labels(tabs, seed: int) -> dict:
    """Per copy-set neuron: the share of its explanation prompts whose next token is a copy target
    (explanation prompts come from the training split, context row = document index)."""
    from ..storyworld.generator import generate_doc

    docs: dict[int, object] = {}
    share: dict[tuple, list[bool]] = {}
    for r in tabs["activating"].to_pylist():
        if r["set"] != "copy" or r["split"] != "explain":
            continue
        d = docs.get(r["context"]) or docs.setdefault(r["context"], generate_doc(r["context"], seed, "train"))
        nxt = r["position"] + 1
        share.setdefault((r["layer"], r["neuron"]), []).append(
            bool(d.labels["is_copy_target"][nxt]) if nxt < len(d.tokens) else False)
    return {k: sum(v) / len(v) for k, v in share.items()}


def parsed_only(classifications: list[dict], which: str) -> float:
    """Mean over pairs of the balanced accuracy over the answers that parsed, as the authors'
    notebook scores (it drops the others): beside the score that counts them wrong, to compare with
    the paper's figures."""
    from ..sweeps.agreement import nanmean

    pairs: dict[tuple, list[dict]] = {}
    for c in classifications:
        if c["set"] == which and c["prediction"] is not None:
            pairs.setdefault((c["layer"], c["neuron"], c["head_layer"], c["head"]), []).append(c)
    out = []
    for cs in pairs.values():
        pos = [c["prediction"] for c in cs if c["truth"]]
        neg = [not c["prediction"] for c in cs if not c["truth"]]
        if pos and neg:
            out.append((sum(pos) / len(pos) + sum(neg) / len(neg)) / 2)
    return nanmean(out)


def run_bench(spec_path: str = "jobs/storyworld.yaml", sweep: str = "lookups", address: str | None = None) -> dict:
    from ..run.audit import open_run, run_targets
    from ..spec import load_spec
    from ..sweeps import lookup_tables as lt
    from ..sweeps.lookup_run import tables

    spec = load_spec(spec_path)
    sws = [s for s in spec.sweeps if s.name == sweep and s.method == "lookups"]
    if not sws:
        from ..errors import InputError

        raise InputError(f"{spec_path}: no look-up sweep named {sweep!r} (sweeps: {[s.name for s in spec.sweeps]})")
    rc = open_run(spec)
    res = run_targets(rc, ["sweeps"], address)
    t = rc.targets[0]
    summ = res[t.id]["sweeps"].sweeps[sweep]
    sets = summ["sets"]
    top, ctl, cp = sets.get("top", {}), sets.get("random", {}), sets.get("copy", {})
    out = {"model": t.model, "revision": t.revision, "run": rc.store.url, "sweep": sweep, "explainer": summ["explainer"],
           "layers": summ["layers"], "n_neurons": top.get("n_neurons", 0), "n_pairs": top.get("n_pairs", 0),
           "n_scored": top.get("n_scored", 0), "explanation_score_mean": top.get("score_mean", math.nan),
           "explanation_score_std": top.get("score_std", math.nan), "control_neurons": ctl.get("n_neurons", 0),
           "control_pairs": ctl.get("n_pairs", 0), "control_scored": ctl.get("n_scored", 0),
           "control_score_mean": ctl.get("score_mean", math.nan), "control_score_std": ctl.get("score_std", math.nan),
           "unparsed": top.get("unparsed", 0) + ctl.get("unparsed", 0), "classified": top.get("classified", 0)
           + ctl.get("classified", 0), "ks_d": top.get("ks_d", math.nan), "ks_p": top.get("ks_p", math.nan),
           "effect_active_mean": top.get("effect_active_mean", math.nan),
           "effect_inactive_mean": top.get("effect_inactive_mean", math.nan),
           "control_ks_d": ctl.get("ks_d", math.nan), "control_ks_p": ctl.get("ks_p", math.nan),
           "induction_match": cp.get("induction_match", math.nan),
           "induction_match_docs": cp.get("induction_match_docs", math.nan),
           "copy_neurons": cp.get("n_copy_neurons", 0), "induction_heads": cp.get("induction_heads"),
           "induction_heads_docs": cp.get("induction_heads_docs"), "wall_s": summ.get("wall_s")}
    tabs = tables(rc.store / t.folder, sweep)
    if cp and rc.resolved.corpus.source == "storyworld":
        share = _copy_labels(tabs, rc.resolved.corpus.seed)
        out["copy_prompt_share"] = sum(share.values()) / len(share) if share else math.nan
        copying = [n for n in tabs["neurons"].to_pylist() if n["set"] == "copy"
                   and share.get((n["layer"], n["neuron"]), 0) >= 0.5 and n["top_head_layer"] is not None]
        k = cp.get("induction_top", 1)
        ind = tabs["induction"].to_pylist()
        out["copying_neurons"] = len(copying)
        for col, name in (("induction_random", "induction_match_copying"), ("induction_docs", "induction_match_copying_docs")):
            heads = lt.top_heads(ind, col, k)
            out[name] = (sum((n["top_head_layer"], n["top_head"]) in heads for n in copying) / len(copying)
                         if copying else math.nan)
    for key, name in (("top", "explanation_score_parsed_mean"), ("random", "control_score_parsed_mean")):
        out[name] = parsed_only(tabs["classifications"].to_pylist(), key)
    s, c = out["explanation_score_mean"], out["control_score_mean"]
    if summ["explainer"] != "offline" or rc.resolved.corpus.source != "storyworld":
        out["targets"] = {}         # the targets are for storyworld with the offline explainer
        return out
    out["targets"] = {"explanation_score_mean>=0.7": bool(s >= TARGETS["explanation_score_mean"]),
                      "margin_over_control>=0.1": bool(s - c >= TARGETS["score_margin"]),
                      "induction_match>=0.8": bool(out["induction_match"] >= TARGETS["induction_match"]),
                      "ks_p<0.01": bool(out["ks_p"] < TARGETS["ks_p"])}
    return out


def render(res: dict) -> str:
    f = lambda v, d=3: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Context look-ups on {res['model']}@{res['revision']}, layers {res['layers']}, explainer {res['explainer']}",
             f"{'neurons':<22}{'neurons':>8}{'pairs':>7}{'scored':>7}{'score mean':>11}{'± std':>7}{'KS D':>7}{'KS p':>10}",
             f"{'next-token':<22}{res['n_neurons']:>8}{res['n_pairs']:>7}{res['n_scored']:>7}"
             f"{f(res['explanation_score_mean']):>11}{f(res['explanation_score_std'], 2):>7}{f(res['ks_d']):>7}"
             f"{res['ks_p']:>10.2g}",
             f"{'random (control)':<22}{res['control_neurons']:>8}{res['control_pairs']:>7}{res['control_scored']:>7}"
             f"{f(res['control_score_mean']):>11}{f(res['control_score_std'], 2):>7}{f(res['control_ks_d']):>7}"
             f"{res['control_ks_p']:>10.2g}",
             f"unparsed answers {res['unparsed']} of {res['classified']} (counted wrong); scores over parsed answers "
             f"only, as the authors' notebook: {f(res['explanation_score_parsed_mean'])} / control "
             f"{f(res['control_score_parsed_mean'])}"]
    if res.get("copy_neurons"):
        lines.append(f"copy targets: {res['copy_neurons']} neurons; induction match {f(res['induction_match'], 2)} "
                     f"(heads {res['induction_heads']}), on storyworld text {f(res['induction_match_docs'], 2)} "
                     f"(heads {res['induction_heads_docs']})")
    if "copy_prompt_share" in res:
        lines.append(f"  their prompts ending before a copied word: {f(res['copy_prompt_share'], 2)}; neurons that copy "
                     f"(≥ half): {res['copying_neurons']}, induction match {f(res['induction_match_copying'], 2)} / "
                     f"on text {f(res['induction_match_copying_docs'], 2)}")
    if res["targets"]:
        lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in res["targets"].items()))
    else:
        lines.append("targets: for storyworld with the offline explainer (docs/benchmarks.md); none here")
    return "\n".join(lines)

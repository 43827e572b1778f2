"""The look-up sweeps' part of the report (context look-ups, Neo, Cohen & Barez, EMNLP 2024; issue 15):
the figures per neuron set, then per neuron its token, its top prompts with the activating token
marked, and its (neuron, head) pairs with the explanation of when the head is active and its score.
One renderer for the HTML page and one for the terminal (``saeray sweep``).

Tokens, prompt texts and explanations come from the model, the corpus or an LLM: every one of them
is escaped with :func:`html.escape` before it is put in the page; the only markup is this module's."""
from __future__ import annotations

import html
import math
import re

from .markup import table
from .sweeps import _fmt

SETS = (("top", "next-token neurons"), ("random", "random neurons, the control"),
        ("copy", "copy targets, storyworld's nonce code words"))
SHORT = {"top": "next-token neurons", "random": "control", "copy": "copy targets"}
PAIR_COLS = [("head", "l"), ("active on", ""), ("when is this head active (explanation)", "w"),
             ("held-out active", ""), ("score", ""), ("TP/FN/TN/FP/unparsed", "")]
PROMPT_COLS = [("#", ""), ("prompt (activating token marked → the neuron's token)", "w"), ("activation", ""),
               ("trimmed", "")]
MAX_NEURONS = 40        # per set, on the page (the rest are in the Parquet tables)
MAX_PROMPTS = 5         # top explanation prompts shown per neuron
MAX_TOKENS = 40         # tokens shown before the activating one (a longer prompt starts with "…")
_SPECIAL = re.compile(r"^(<\|[^<>|]*\|>|<(bos|eos|s|/s|pad|unk|endoftext)>)$")


def _special(tok: str) -> bool:
    return bool(_SPECIAL.match(tok))


def head_name(layer, head) -> str:
    return f"L{layer}H{head}"


def _heads(hs) -> str:
    return ", ".join(head_name(l, h) for l, h in hs or [])


def _pct(v, digits: int = 0) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}%"


def _esc_token(tok: str) -> str:
    """One token as page text: escaped; a token of only whitespace with a newline shown as ↵."""
    if tok and not tok.strip():
        return "<span class=muted>↵</span>" if "\n" in tok else html.escape(tok)
    return html.escape(tok)


def prompt_html(tokens: list[str], predicted: str, max_tokens: int = MAX_TOKENS) -> str:
    """A trimmed prompt with its last token (where the neuron fires) in ``<mark>`` and the neuron's
    token after an arrow. Leading special tokens (BOS) are dropped, later ones shown muted; tokens
    that carry their own spaces (BPE) are joined as they are, word-level tokens with spaces."""
    if not tokens:
        return ""
    body, last = list(tokens[:-1]), tokens[-1]
    while body and _special(body[0]):
        body.pop(0)
    cut = len(body) > max_tokens
    body = body[len(body) - max_tokens:] if cut else body
    sep = "" if any(t[:1].isspace() for t in body + [last, predicted]) else " "
    words = [f"<span class=muted>{html.escape(t)}</span>" if _special(t) else _esc_token(t) for t in body]
    out = ("<span class=muted>…</span>" + sep if cut else "") + sep.join(words)
    lead = last[:len(last) - len(last.lstrip())] if last.strip() else ""   # a BPE token's own space: not marked
    out += (sep if words else "") + html.escape(lead) + f"<mark>{_esc_token(last[len(lead):])}</mark>"
    shown = predicted.strip() or repr(predicted)
    return out + f" <span class=muted>→</span> <b>{html.escape(shown)}</b>"


def _cells(cols: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """A full-width table whose cells are already HTML (built here, every model- or corpus-derived
    part escaped); ``cols``: (header, css class of the column: "" numbers, "l" a label, "w" text)."""
    cls = [f" class={c}" if c else "" for _, c in cols]
    h = "".join(f"<th{k}>{html.escape(t)}</th>" for (t, _), k in zip(cols, cls))
    body = "".join("<tr>" + "".join(f"<td{k}>{v}</td>" for v, k in zip(r, cls)) + "</tr>" for r in rows)
    return f"<table class=lk><tr>{h}</tr>{body}</table>"


def _score(fig: dict, space: str = "\u00a0") -> str:
    m, s = fig.get("score_mean"), fig.get("score_std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}{space}±{space}{s:.3f}" if s is not None and not math.isnan(s) else f"{m:.3f}"


def figures_html(sets: dict) -> str:
    rows = []
    for s, title in SETS:
        f = sets.get(s)
        if f is None:
            continue
        rows.append([f"{s}: {SHORT[s]}", f.get("n_neurons"), f.get("n_with_prompts"), f.get("n_pairs"), f.get("n_scored"),
                     _score(f), f.get("unparsed"), f.get("ks_d"), f.get("ks_p"), f.get("effect_active_mean"),
                     f.get("effect_inactive_mean")])
    out = [table(["neuron set", "neurons", "with prompts", "pairs", "scored pairs", "score (mean ± std)", "unparsed",
                  "KS D", "KS p", "Δp head active", "Δp head inactive"], rows, _fmt)]
    c = sets.get("copy")
    if c and "induction_match" in c:
        k = c.get("induction_top")
        out.append(f"<p>Copy targets whose top upstream head is among the model's {html.escape(str(k))} top "
                   f"induction heads (of {html.escape(str(c.get('n_copy_neurons')))} with prompts):</p>")
        out.append(table(["induction measured on", "match", "induction heads"],
                         [["random-token sequences repeated", _pct(c.get("induction_match"), 1),
                           _heads(c.get("induction_heads"))],
                          ["repeats inside corpus documents", _pct(c.get("induction_match_docs"), 1),
                           _heads(c.get("induction_heads_docs"))]], _fmt))
    return "\n".join(out)


def _rows(tabs: dict | None, name: str) -> list[dict]:
    t = (tabs or {}).get(name)
    return t.to_pylist() if t is not None else []


def _by(rows: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[f] for f in fields), []).append(r)
    return out


def _congruence(n: dict) -> float:
    c = n.get("congruence")
    return -math.inf if c is None or math.isnan(c) else c


def _act(v) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.2f}"


def _pair_rows(pairs: list[dict], expl: dict[tuple, list[dict]], key: tuple) -> list[list[str]]:
    rows = []
    for p in sorted(pairs, key=lambda p: (p["head_layer"], p["head"])):
        e = (expl.get(key + (p["head_layer"], p["head"])) or [None])[0]
        share = _pct(p["share"])
        if e is None:
            rows.append([head_name(p["head_layer"], p["head"]), share, "<span class=muted>not explained yet</span>",
                         "–", "–", "–"])
            continue
        share += f"\u00a0({e['n_active']}/{e['n_active'] + e['n_inactive']})"
        held = f"{e['n_test_active']}/{e['n_test']}"
        if e["skipped"]:
            text = f"<span class=muted>skipped: {html.escape(e['skipped'])}</span>"
            score, conf = "–", "–"
        else:
            text = html.escape(e["explanation"]) or "<span class=muted>(empty explanation)</span>"
            score = _act(e["score"])
            conf = "/".join(str(e[k]) for k in ("tp", "fn", "tn", "fp", "unparsed"))
        rows.append([head_name(p["head_layer"], p["head"]), share, text, held, score, conf])
    return rows


def neuron_html(n: dict, prompts: list[dict], pairs: list[dict], expl: dict[tuple, list[dict]]) -> str:
    key = (n["set"], n["layer"], n["neuron"])
    top = ""
    if n.get("top_head_layer") is not None:
        top = f" · top upstream head {head_name(n['top_head_layer'], n['top_head'])}"
    out = [f"<p class=lk><b>L{n['layer']} N{n['neuron']}</b> predicts <b>{html.escape(n['token'])}</b> "
           f"<span class=muted>· congruence {html.escape(_fmt(n['congruence']))} · {n['n_explain']} explanation "
           f"prompts, {n['n_test']} held out{top}</span></p>"]
    shown = sorted((p for p in prompts if p["split"] == "explain"), key=lambda p: p["rank"])[:MAX_PROMPTS]
    if shown:
        out.append(_cells(PROMPT_COLS, [[str(p["rank"] + 1), prompt_html(p["tokens"], n["token"]),
                                         _act(p["activation"]), _act(p["trimmed_activation"])] for p in shown]))
    out.append(_cells(PAIR_COLS, _pair_rows(pairs, expl, key)))
    return "\n".join(out)


def neurons_html(tabs: dict, limit: int = MAX_NEURONS) -> str:
    neurons = _rows(tabs, "neurons")
    prompts = _by(_rows(tabs, "activating"), "set", "layer", "neuron")
    pairs = _by(_rows(tabs, "pairs"), "set", "layer", "neuron")
    expl = _by(_rows(tabs, "explanations"), "set", "layer", "neuron", "head_layer", "head")
    out = []
    for s, title in SETS:
        ns = [n for n in neurons if n["set"] == s]
        if not ns:
            continue
        with_pairs = [n for n in ns if pairs.get((s, n["layer"], n["neuron"]))]
        shown = sorted(with_pairs, key=lambda n: (-_congruence(n), n["layer"], n["neuron"]))[:limit]
        out.append(f"<h3>Per neuron: {html.escape(title)}</h3>")
        layers = sorted({n["layer"] for n in ns})
        per_layer = ", ".join(f"layer {L}: {sum(n['layer'] == L for n in with_pairs)} of "
                              f"{sum(n['layer'] == L for n in ns)}" for L in layers)
        note = (f"{len(with_pairs)} of {len(ns)} neurons have a (neuron, head) pair worth explaining ({per_layer}); "
                f"the {len(ns) - len(with_pairs)} without one are not shown")
        if len(shown) < len(with_pairs):
            note += f"; {len(with_pairs) - len(shown)} more with pairs left out (lowest congruence)"
        out.append(f"<p class=muted>{note}.</p>")
        for layer in layers:
            mine = sorted((n for n in shown if n["layer"] == layer), key=lambda n: (-_congruence(n), n["neuron"]))
            if not mine:
                continue
            out.append(f"<h4>Layer {layer}</h4>")
            for n in mine:
                key = (s, n["layer"], n["neuron"])
                out.append(neuron_html(n, prompts.get(key, []), pairs.get(key, []), expl))
    return "\n".join(out)


NOTE = ("Score: balanced accuracy of a classifier that reads only the explanation and answers, for each held-out "
        "prompt, whether the head is active on it (0.5 is chance; answers neither yes nor no count as wrong). A head "
        "is active on a prompt when its write along the neuron's input, at the last position, exceeds the mean + 2σ of "
        "that prompt's head scores; a pair is worth explaining when the head is active on 25–75 % of the neuron's "
        "prompts, and is skipped when its held-out prompts are all active or all inactive. Δp: mean change of the "
        "neuron's token probability when the head's output is zeroed (p unedited − p ablated), on prompts where the "
        "head is active or inactive; KS D and p: two-sample Kolmogorov–Smirnov test between the two. Activation: the "
        "neuron's activation at the marked token in its corpus context, and on the trimmed prompt shown. Every "
        "prompt, pair and classifier answer: targets/&lt;target&gt;/sweeps/&lt;sweep&gt;/ (Parquet).")


def render_html(target: str, name: str, res: dict, tabs: dict | None) -> str:
    """One look-up sweep's section; ``tabs`` as :func:`saeray.sweeps.lookup_run.tables` returns them,
    or None (then only the figures)."""
    parts = [f"<h2>Sweep {html.escape(name)} in {html.escape(target)}: context look-ups</h2>"]
    expl = _rows(tabs, "explanations")
    explainer = next((e["explainer"] for e in expl if e.get("explainer")), res.get("explainer", "?"))
    layers = ", ".join(str(l) for l in res.get("layers", []))
    parts.append(f"<p>MLP neurons that predict a token, on layer{'s' if len(res.get('layers', [])) != 1 else ''} "
                 f"{html.escape(layers)}: the prompts that fire them, the earlier attention heads that switch them on, "
                 f"and an explanation of when each head is active, written by {html.escape(str(explainer))} and "
                 "scored on held-out prompts.</p>")
    parts.append(figures_html(res.get("sets", {})))
    if tabs is not None:
        parts.append(neurons_html(tabs))
    else:
        parts.append("<p class=muted>The sweep's tables could not be read: figures only.</p>")
    parts.append(f"<p class=muted>{NOTE}</p>")
    return "\n".join(parts)


def render_text(target: str, name: str, res: dict) -> str:
    lines = [f"sweep {name} — {target} (context look-ups, explainer {res.get('explainer', '?')}, "
             f"layers {', '.join(str(l) for l in res.get('layers', []))})"]
    for s, _ in SETS:
        f = res.get("sets", {}).get(s)
        if f is None:
            continue
        lines.append(f"  {s} ({SHORT[s]}): {f.get('n_neurons')} neurons ({f.get('n_with_prompts')} with prompts), "
                     f"{f.get('n_pairs')} pairs, {f.get('n_scored')} scored: score {_score(f, ' ')}, "
                     f"{f.get('unparsed')} unparsed; ablation KS D {_fmt(f.get('ks_d'))} p {_fmt(f.get('ks_p'))}")
        if "induction_match" in f:
            lines.append(f"    induction match (top {f.get('induction_top')} heads): random sequences "
                         f"{_pct(f.get('induction_match'), 1)} ({_heads(f.get('induction_heads'))}), in documents "
                         f"{_pct(f.get('induction_match_docs'), 1)} ({_heads(f.get('induction_heads_docs'))})")
    return "\n".join(lines)

"""The look-up sweeps' report section (issue 15), from tables built by hand with the sweep's schemas:
the activating token marked, everything from the model or an explainer escaped, scores, skipped
reasons and the per-set figures shown; dispatch from the sweeps section and the whole page, and the
tables read back from a run folder. No Ray, no model."""
from __future__ import annotations

import math
import re

import pyarrow as pa
import pytest

from saeray.report import lookups
from saeray.report.build import tables_reader
from saeray.report.page import asset_files
from saeray.report.sweeps import render_html as render_sweeps
from saeray.report.sweeps import render_text as render_sweeps_text
from saeray.sweeps.lookup_tables import SCHEMAS

T = "sw@main"
EVIL = 'when "quotes" appear <script>alert(1)</script> & co'


def _neuron(s, layer, neuron, token, congruence, n_pairs, top=(1, 3)):
    return dict(target=T, set=s, layer=layer, neuron=neuron, token=token, token_id=7, congruence=congruence,
                n_explain=20, n_test=10, n_pairs=n_pairs, top_head_layer=top[0], top_head=top[1])


def _prompt(s, layer, neuron, rank, tokens, act, split="explain"):
    return dict(target=T, set=s, layer=layer, neuron=neuron, split=split, rank=rank, context=rank, position=3,
                activation=act, trimmed_activation=act - 0.5, start=0, tokens=tokens, text=" ".join(tokens[1:]),
                active_heads=[7], head_scores=[0.1] * 8)


def _expl(s, layer, neuron, token, hl, h, explanation="", score=math.nan, skipped="", conf=(0, 0, 0, 0, 0)):
    tp, fn, tn, fp, un = conf
    return dict(target=T, set=s, layer=layer, neuron=neuron, token=token, head_layer=hl, head=h, explainer="offline-rules",
                explanation=explanation, n_active=12, n_inactive=8, n_test=10, n_test_active=4, score=score,
                tp=tp, fn=fn, tn=tn, fp=fp, unparsed=un, skipped=skipped)


def _tables() -> dict:
    neurons = [_neuron("top", 2, 5, "dog", 0.5, 2), _neuron("top", 2, 7, "cow", 0.45, 0),
               _neuron("top", 3, 9, "<i>", 0.4, 1, top=(0, 1)), _neuron("random", 2, 11, "hat", 0.1, 0),
               _neuron("copy", 2, 13, "dax", 0.3, 0)]
    activating = [_prompt("top", 2, 5, r, ["<bos>", "emma", "has", "a", f"pet{r}"], 3.0 - r / 10) for r in range(7)]
    activating += [_prompt("top", 2, 5, 0, ["<bos>", "held", "out"], 9.9, split="test"),
                   _prompt("top", 3, 9, 0, ["<bos>", "the", "<b>", "x"], 1.5)]
    pairs = [dict(target=T, set="top", layer=2, neuron=5, token="dog", head_layer=1, head=3, share=0.6),
             dict(target=T, set="top", layer=2, neuron=5, token="dog", head_layer=0, head=2, share=0.3),
             dict(target=T, set="top", layer=3, neuron=9, token="<i>", head_layer=0, head=1, share=0.5)]
    expl = [_expl("top", 2, 5, "dog", 1, 3, EVIL, 0.8125, conf=(3, 1, 4, 0, 1)),
            _expl("top", 2, 5, "dog", 0, 2, skipped="held-out prompts all active")]
    cols = {"neurons": neurons, "activating": activating, "pairs": pairs, "explanations": expl}
    return {k: pa.Table.from_pylist(cols.get(k, []), schema=s) for k, s in SCHEMAS.items()}


FIG = dict(n_neurons=60, n_with_prompts=58, n_pairs=8, n_scored=7, score_mean=0.8729, score_std=0.2003, unparsed=2,
           classified=70, ks_d=0.3112, ks_p=1.2316e-05, effect_active_mean=0.08, effect_inactive_mean=0.197)
RES = {"method": "lookups", "explainer": "offline", "layers": [2, 3], "items": 7, "wall_s": 1.0,
       "sets": {"top": FIG, "random": dict(FIG, score_mean=0.5, score_std=0.01),
                "copy": dict(FIG, induction_top=4, n_copy_neurons=60, induction_match=0.11666,
                             induction_heads=[[0, 0], [1, 3]], induction_match_docs=0.0333,
                             induction_heads_docs=[[2, 2], [3, 1]])}}


def test_report_marks_the_activating_token_and_escapes_model_text():
    page = lookups.render_html(T, "lk", RES, _tables())
    # the last token of the trimmed prompt is marked, the neuron's token follows the arrow, BOS is not shown
    assert "emma has a <mark>pet0</mark> <span class=muted>→</span> <b>dog</b>" in page
    assert "&lt;bos&gt;" not in page and "<bos>" not in page
    # a token that looks like markup is text, inside the prompt and as the neuron's token
    assert "the &lt;b&gt; <mark>x</mark> <span class=muted>→</span> <b>&lt;i&gt;</b>" in page
    assert "predicts <b>&lt;i&gt;</b>" in page and "<i>" not in page
    # an explanation is text, not markup
    assert "<script>" not in page
    assert "when &quot;quotes&quot; appear &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


def test_report_neuron_blocks_show_prompts_pairs_scores_and_skips():
    page = lookups.render_html(T, "lk", RES, _tables())
    assert "<b>L2 N5</b> predicts <b>dog</b>" in page and "top upstream head L1H3" in page
    # the top 5 explanation prompts by rank, not the 6th or the held-out ones, with activations
    assert all(f"<mark>pet{r}</mark>" in page for r in range(5))
    assert "pet5" not in page and "held out <mark>" not in page and "9.90" not in page
    assert "<td>3.00</td><td>2.50</td>" in page
    # the scored pair: head, share of prompts active, score, confusion counts
    assert "<td class=l>L1H3</td><td>60%\u00a0(12/20)</td>" in page
    assert "<td>4/10</td><td>0.81</td><td>3/1/4/0/1</td>" in page
    # the skipped pair: its reason, no score
    assert "<td class=l>L0H2</td>" in page
    assert "skipped: held-out prompts all active</span></td><td>4/10</td><td>–</td>" in page
    # a pair of a neuron whose explaining step has not run yet
    assert "L0H1" in page and "not explained yet" in page
    # neurons without pairs are counted, not shown
    assert "2 of 3 neurons have a (neuron, head) pair" in page and "layer 2: 1 of 2, layer 3: 1 of 1" in page
    assert "N7</b>" not in page and "N11</b>" not in page
    assert "0 of 1 neurons" in page            # random and copy: none with pairs
    # grouped by layer, the higher-congruence neuron first
    assert page.index("<h4>Layer 2</h4>") < page.index("L2 N5") < page.index("<h4>Layer 3</h4>") < page.index("L3 N9")


def test_report_per_set_figures_and_induction_match():
    page = lookups.render_html(T, "lk", RES, None)
    for s in ("top: next-token neurons", "random: control", "copy: copy targets"):
        assert f"<td class=l>{s}</td><td>60</td><td>58</td><td>8</td><td>7</td>" in page
    assert "<td>0.873\u00a0±\u00a00.200</td><td>2</td><td>0.311</td><td>1.23e-05</td><td>0.08</td><td>0.197</td>" in page
    assert "<td>0.500\u00a0±\u00a00.010</td>" in page
    assert "<td class=l>random-token sequences repeated</td><td>11.7%</td><td>L0H0, L1H3</td>" in page
    assert "<td class=l>repeats inside corpus documents</td><td>3.3%</td><td>L2H2, L3H1</td>" in page
    # without tables: the figures only, and the page says so
    assert "<mark>" not in page and "could not be read" in page


def test_report_caps_neurons_per_set():
    page = lookups.neurons_html(_tables(), limit=1)
    assert "L2 N5" in page and "L3 N9" not in page and "1 more with pairs left out" in page


def test_report_prompt_with_bpe_tokens_and_long_prompts():
    got = lookups.prompt_html(["<|endoftext|>", "The", " cat", "\n", " sat"], " on")
    assert got == "The cat<span class=muted>↵</span> <mark>sat</mark> <span class=muted>→</span> <b>on</b>"
    long = lookups.prompt_html(["<bos>"] + [f"w{i}" for i in range(60)], "z", max_tokens=10)
    assert long.startswith("<span class=muted>…</span> w49 w50") and "w48" not in long
    assert "<mark>w59</mark>" in long


def test_report_text_lines_per_set():
    text = lookups.render_text(T, "lk", RES)
    lines = text.splitlines()
    assert lines[0] == "sweep lk — sw@main (context look-ups, explainer offline, layers 2, 3)"
    assert lines[1] == ("  top (next-token neurons): 60 neurons (58 with prompts), 8 pairs, 7 scored: score 0.873 ± 0.200, "
                        "2 unparsed; ablation KS D 0.311 p 1.23e-05")
    assert lines[2].startswith("  random (control):") and lines[3].startswith("  copy (copy targets):")
    assert lines[4] == ("    induction match (top 4 heads): random sequences 11.7% (L0H0, L1H3), "
                        "in documents 3.3% (L2H2, L3H1)")


GRADSAE = {"error_term": False, "output": "prob", "aggregate": "mean",
           "agreement": [{"hookpoint": "resid_post.1", "sae": "topk", "prompt_set": "q", "prompts": 4, "correct": 3,
                          "n_active": 5.0, "gradsae_spearman": 0.5, "gradsae_pearson": 0.4, "gradsae_topk_overlap": 0.6,
                          "signed_spearman": 0.7, "ig_spearman": 0.1, "ig_topk_overlap": 0.2,
                          "activation_spearman": 0.3, "gradsae_latents_per_s": 100.0, "exact_latents_per_s": 10.0}],
           "masking": [], "steering": []}


def test_report_sweeps_section_dispatches_lookups_and_keeps_gradsae():
    asked = []

    def tables(target, name):
        asked.append((target, name))
        return _tables()

    only_g = render_sweeps(T, {"g": GRADSAE})
    assert render_sweeps(T, {"g": GRADSAE}, tables) == only_g and asked == []   # gradsae: tables never read
    assert only_g.endswith("(Parquet; docs/store.md).</p>")
    both = render_sweeps(T, {"g": GRADSAE, "lk": RES}, tables)
    assert asked == [(T, "lk")]
    assert both.startswith(only_g)           # the GradSAE part (its footnote included) unchanged, before the look-ups
    assert "<h2>Sweep lk in sw@main: context look-ups</h2>" in both and "<mark>pet0</mark>" in both
    assert both.count("ρ: Spearman") == 1
    lk_only = render_sweeps(T, {"lk": RES}, tables)
    assert "ρ: Spearman" not in lk_only and "GradSAE" not in lk_only
    assert "<mark>" not in render_sweeps(T, {"lk": RES})     # no reader: figures only
    text = render_sweeps_text(T, {"g": GRADSAE, "lk": RES})
    assert text.splitlines()[0] == "sweep g — sw@main" and "GradSAE ρ 0.5" in text
    assert "sweep lk — sw@main (context look-ups" in text and "  top (next-token neurons): 60 neurons" in text


def _write_run(root) -> None:
    """A run folder with one target whose look-up sweep finished one item (tables + records)."""
    from saeray.run.records import Records
    from saeray.store import Store
    from saeray.sweeps.grid import to_parquet

    tgt = Store.open(str(root)) / "targets/sw@main"
    for name, tab in _tables().items():
        if name == "induction":
            continue
        tgt.write_bytes(f"sweeps/lk/{name}/top@L02@000.parquet", to_parquet(tab))
    Records(tgt / "sweeps/lk", "items").put("top@L02@000", {})
    Records(tgt / "sweeps/lk", "explained").put("top@L02@000", {})


def test_report_page_reads_lookup_tables_from_the_run_folder(tmp_path):
    from saeray.store import Store

    _write_run(tmp_path)
    summary = {"run": "r", "saes": [], "targets": [{"target": T, "model": "sw", "revision": "main",
                                                     "folder": "targets/sw@main"}],
               "stage_wall_s": {}, "sweeps": {T: {"lk": RES}}}
    run = Store.open(str(tmp_path))
    page = render_sweeps(T, {"lk": RES}, tables_reader(run, summary))
    css = asset_files()["report.css"].decode()
    assert re.search(r"(?m)(^|\})mark\{", css) and "td.w{" in css       # the stylesheet has the section's rules
    assert "emma has a <mark>pet0</mark>" in page and "&lt;script&gt;" in page and "<script>" not in page
    # a sweep whose tables are missing or unreadable: figures only, the page still renders
    assert tables_reader(run, summary)("other@main", "lk") is None
    (tmp_path / "targets/sw@main/sweeps/lk/neurons/top@L02@000.parquet").write_bytes(b"not parquet")
    page = render_sweeps(T, {"lk": RES}, tables_reader(run, summary))
    assert "could not be read" in page and "<td>0.873\u00a0±\u00a00.200</td>" in page
    # without a reader (as before): figures only
    assert "could not be read" in render_sweeps(T, {"lk": RES})


@pytest.mark.parametrize("v,want", [(math.nan, "–"), (None, "–"), (0.25, "25%")])
def test_report_percent_cells(v, want):
    assert lookups._pct(v) == want

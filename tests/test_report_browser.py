"""The report in a real browser (headless Chromium through Playwright; tests/browser.py) after a
real audit on a local Ray: a tiny random GPT-NeoX whose tokenizer has hostile tokens (a script
tag, an attribute-breaking image tag, HTML entities) and a text corpus full of them.

Every page loads from file:// with no console error, no failed request and no horizontal
overflow at 1280 pixels; the overview's sections and tables and a dashboard's contexts are in the
DOM; a table sorts on click; the hostile strings render as text on every page and no script of
theirs runs. Screenshots of each page type go to test-artifacts/."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from saeray.run.audit import run_audit
from saeray.spec import parse_spec

from browser import Visit, browser, check_all_pages

SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IMG = '"><svg/onload=window.__pwned=2>'      # no spaces: one token of the whitespace tokenizer
ENTITY = "&lt;b&gt;&amp;&#x41;"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "saw", "bird", "tree", "."]
HOSTILE = [SCRIPT, IMG, ENTITY]

pytestmark = pytest.mark.slow


def _model(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS + HOSTILE)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()     # the hostile tokens stay whole
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def _corpus(folder):
    import random

    rng = random.Random(0)
    folder.mkdir()
    docs = []
    for _ in range(160):
        words = [rng.choice(WORDS + HOSTILE) for _ in range(40)]
        docs.append(" ".join(words))
    (folder / "hostile.txt").write_text("\n\n".join(docs) + "\n")


def _spec(tmp) -> dict:
    return {"name": "hostile", "model": {"name": str(tmp / "model")},
            "corpus": {"source": str(tmp / "corpus"), "n_docs": 128, "context_len": 32, "heldout_docs": 16},
            "hookpoints": ["resid_post.0", "resid_post.1"], "harvest": {"batch_size": 16, "unit_contexts": 64},
            "sae": {"architectures": [{"arch": "topk", "width": 48, "k": 4}, {"arch": "relu", "width": 48, "l1": 1.0}],
                    # a Ray task per hook point: the pages are under test, Ray Train's start-up is not
                    "train": {"tokens": 6000, "batch_size": 200, "launcher": "task"}},
            "evaluation": {"batch_size": 16}, "dashboards": {"all_up_to": 32, "frequent": 8, "random": 8},
            "store": str(tmp / "store"),
            "resources": {"harvest": {"num_cpus": 0.5}, "train": {"num_cpus": 0.5}, "eval": {"num_cpus": 0.5}}}


@pytest.fixture(scope="module")
def hostile_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    _model(tmp / "model")
    _corpus(tmp / "corpus")
    run_audit(parse_spec(json.dumps(_spec(tmp))))
    return tmp / "store" / "hostile"


def test_every_page_loads_clean_and_hostile_strings_stay_text(hostile_run):
    report = hostile_run / "report"
    pages = check_all_pages(report, "hostile", max_dashboards=4)
    assert "index.html" in pages and any(p.startswith("dashboards/") for p in pages)
    with browser() as b:
        for rel in pages:
            v = Visit(b, report / rel).open()
            # nothing the corpus or the tokenizer wrote became an element or ran
            assert v.page.evaluate("window.__pwned") is None
            assert v.page.locator("[onload], [onerror]").count() == 0
            assert v.page.locator("script:not([src])").count() == 0
            v.check_clean()
            v.page.close()
        # a dashboard shows the hostile tokens as text, in its contexts and its logit lens
        dash = sorted(report.glob("dashboards/**/topk-*.html"))[0]
        v = Visit(b, dash).open()
        text = v.page.locator("#feature").inner_text()
        shown = " ".join(v.page.locator("#contexts .ctx span.t").all_inner_texts()
                         + v.page.locator("#feature table td").all_inner_texts())
        for s in HOSTILE:
            assert s in shown, f"{s!r} is not on the dashboard as text"
        assert "Top activations" in text


def test_overview_sections_sorting_and_dashboard_contexts(hostile_run):
    report = hostile_run / "report"
    with browser() as b:
        v = Visit(b, report / "index.html").open()
        for h in ("Targets", "Stage times (s)", "SAEs", "Trade-offs", "Feature dashboards"):
            assert v.page.locator("h2", has_text=h).count() == 1, h
        stage_heads = v.page.locator("#stages ~ div table").first.locator("th").all_inner_texts()
        assert {"harvest", "train", "evaluate", "dashboards"} <= set(stage_heads)
        assert "report" in v.page.content()
        # the SAE table sorts on a header click, largest first for numbers, then reversed
        table = v.page.locator("table.sortable").nth(2)
        heads = table.locator("thead th").all_inner_texts()
        col = heads.index("L0")

        def column() -> list[float]:
            return [float(t) for t in table.locator(f"tbody tr td:nth-child({col + 1})").all_inner_texts()]

        table.locator("thead th").nth(col).click()
        desc = column()
        assert desc == sorted(desc, reverse=True) and len(desc) == 4
        table.locator("thead th").nth(col).click()
        assert column() == sorted(desc)
        # every SAE links to its dashboard, and the link opens a page with contexts
        links = v.page.locator("a", has_text="latents")
        assert links.count() == 4
        href = links.first.get_attribute("href")
        v.check_clean()
        d = Visit(b, report / href).open()
        d.check_clean()
        assert d.page.locator("#latents tbody tr").count() >= 16
        first = int(d.page.locator("#latents tbody tr").first.get_attribute("data-latent"))
        # a latent chosen by its #index renders, with its top contexts and per-token shading
        d.page.goto(d.url + "#" + str(first))
        d.page.wait_for_timeout(100)
        assert d.page.locator("#feature h2").inner_text().startswith(f"Latent {first}")
        ctx = d.page.locator("#contexts .ctx")
        if ctx.count():
            shaded = d.page.locator("#contexts span.t[style*='background']")
            assert shaded.count() >= 1
            assert re.search(r"\d", d.page.locator("#contexts span.q").first.get_attribute("title"))
        d.screenshot("hostile-dashboard-latent")


def _dashboard_data(js_path) -> dict:
    text = js_path.read_text()
    assert text.startswith("window.SAERAY_DASH = ")
    return json.loads(text[len("window.SAERAY_DASH = "):].rstrip().rstrip(";").replace("<\\/", "</"))


def test_neuronpedia_export_equals_the_dashboards(hostile_run, tmp_path):
    import gzip

    from saeray.dashboards.export import export_run
    from saeray.store import Store

    res = export_run(Store.open(str(hostile_run)), Store.open(str(tmp_path / "np")), "neuronpedia")
    assert res["saes"] and res["features"] > 0
    for sae in res["saes"]:
        page_js = hostile_run / "report" / "dashboards" / "model@main" / sae["hookpoint"] / f"{sae['sae']}.js"
        shown = {f["feature_index"]: f for f in _dashboard_data(page_js)["features"]}
        out = Path(sae["dir"].removeprefix("file://"))
        assert out.is_relative_to(tmp_path / "np") and (out / "source.jsonl").exists()
        feats = [json.loads(x) for f in sorted((out / "features").glob("*.jsonl.gz"))
                 for x in gzip.decompress(f.read_bytes()).splitlines()]
        acts = [json.loads(x) for f in sorted((out / "activations").glob("*.jsonl.gz"))
                for x in gzip.decompress(f.read_bytes()).splitlines()]
        assert {int(f["index"]) for f in feats} == set(shown)
        for f in feats:
            d = shown[int(f["index"])]
            assert (f["pos_str"], f["pos_values"], f["frac_nonzero"]) == (d["pos_str"], d["pos_values"], d["frac_nonzero"])
            assert f["topkCosSimIndices"] == d["saeray"]["neighbours"]
        by_feature: dict[int, list] = {}
        for a in acts:
            by_feature.setdefault(int(a["index"]), []).append(a)
        for i, d in shown.items():
            got = by_feature.get(i, [])
            assert [(a["tokens"], a["values"], a["qualifyingTokenIndex"], a["binMin"]) for a in got] == \
                [(c["tokens"], c["values"], c["qualifying_token_index"], c["bin_min"]) for c in d["activations"]]


def test_saeray_report_rebuilds_the_pages_from_the_store(hostile_run):
    import shutil
    import subprocess
    import sys

    report = hostile_run / "report"
    before = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    shutil.rmtree(report)
    out = subprocess.run([sys.executable, "-m", "saeray", "report", str(hostile_run), "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dashboards"] == 4 and res["report"].endswith("report/index.html")
    after = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    # byte for byte, except the overview (its stage-times table holds the report's own build time) and
    # summary.json (the audit adds its total wall time); the SAE rows are the same
    changed = {p for p in after if after[p] != before[p]}
    assert changed <= {Path("index.html"), Path("summary.json")}
    assert json.loads(after[Path("summary.json")])["saes"] == json.loads(before[Path("summary.json")])["saes"]
    bad = subprocess.run([sys.executable, "-m", "saeray", "report", str(hostile_run / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_report_built_on_object_storage_opens_from_a_copied_folder(hostile_run, s3_url, tmp_path):
    """`saeray report s3://...` writes the same pages through the store; copied off S3 into a
    folder, they open in the browser as they are (relative links only, no server)."""
    import subprocess
    import sys

    from saeray.store import Store

    s3 = Store.open(s3_url) / "hostile"
    for part in ("manifest.json", "targets"):
        src = hostile_run / part
        if src.is_dir():
            s3.put_dir(str(src), part)
        else:
            s3.write_bytes(part, src.read_bytes())
    out = subprocess.run([sys.executable, "-m", "saeray", "report", s3.url], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s3.get_dir("report", str(tmp_path / "copy"))
    local = hostile_run / "report"
    for js in local.glob("dashboards/*/*/*.js"):
        assert (tmp_path / "copy" / js.relative_to(local)).read_bytes() == js.read_bytes()
    pages = check_all_pages(tmp_path / "copy", "s3-copy", max_dashboards=1)
    assert "index.html" in pages


def test_dashboards_resume_after_a_kill_and_follow_their_settings(hostile_run):
    """Last in this module: it changes the run's dashboard settings. A changed ``dashboards``
    section recomputes the dashboards (the SAEs stay); a driver killed midway resumes, keeping the
    batches written before the kill and writing each missing one once."""
    from conftest import kill_cli_midway

    tmp = hostile_run.parent.parent
    spec = _spec(tmp)
    spec["dashboards"].update(top=5, batch_latents=4)
    (tmp / "spec.json").write_text(json.dumps(spec))
    target = hostile_run / "targets" / "model@main"
    units = target / "_records" / "dashboards"
    sae_file = next(target.glob("saes/resid_post.0/topk-*/sae_weights.safetensors"))
    sae_mtime = sae_file.stat().st_mtime_ns

    def recorded():   # not the hidden temporary a record being written at the kill leaves behind
        return [p for p in units.glob("*.json") if not p.name.startswith(".")] if units.exists() else []

    def done() -> int:
        return len(recorded())

    alive, n = kill_cli_midway(["audit", str(tmp / "spec.json")], done, at_least=3, timeout=400)
    assert alive and 3 <= n < 16, (alive, n)
    kept = {p: p.stat().st_mtime_ns for p in recorded()}
    before = {u.stem: (target / "dashboards" / u.stem.split("@")[0] / u.stem.split("@")[1]
                       / f"batch-{u.stem.split('@')[2]}.json") for u in kept}
    stamps = {k: p.stat().st_mtime_ns for k, p in before.items()}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "saeray", "audit", str(tmp / "spec.json")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {k: p.stat().st_mtime_ns for k, p in before.items()} == stamps      # not recomputed
    records = json.loads((target / "_records" / "dashboards.json").read_text())
    new = {u: r for u, r in records.items() if u.endswith("@" + next(iter(kept)).stem.rsplit("@", 1)[1])}
    assert len(new) == 16 and sum(r["latents"] for r in new.values()) == 64      # each batch once
    batches = sorted(target.glob("dashboards/*/*/batch-*.json"))
    assert len(batches) == 16
    for b in batches:
        feats = json.loads(b.read_text())["features"]
        assert len(feats) == 4 and all(sum(a["bin_contains"] == -1 for a in f["activations"]) <= 5 for f in feats)
    assert sae_file.stat().st_mtime_ns == sae_mtime

"""The planted-concept recovery section without a cluster: presence scores every SAE of a hook
point beside one linear probe; the emergence analysis reads its chosen SAE's rows and the linear
ones; the report section escapes names, marks concepts the SAEs miss although the linear probe
reads them, links latents; its tables are read from a run folder for the targets that finished."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saeray.emergence.analysis import of_sae
from saeray.emergence.presence import SCHEMA, read_presence, score_hookpoint, table_path
from saeray.report.concepts import read_tables, render_html, summary_rows
from saeray.sae import io as sae_io
from saeray.sae.registry import build
from saeray.store import Store

HP = "resid_post.1"


def _problem(n: int = 4000, d: int = 16, seed: int = 0):
    """Activations where concept 'a' is a direction, 'b' another, 'rare' has too few positives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = np.stack([(x[:, 0] > 0.8).numpy(), (x[:, 1] - x[:, 2] > 1.0).numpy(), np.arange(n) < 6], 1)
    train = np.arange(n) % 2 == 0
    return x.numpy().astype(np.float16), y, train


def test_score_hookpoint_scores_every_sae_and_the_linear_probe_once(tmp_path):
    acts, y, train = _problem()
    urls = {}
    for name, sae in (("topk-w32-k4", build("topk", 16, 32, k=4)), ("relu-w32-l1-0.1", build("relu", 16, 32, l1=0.1))):
        urls[name] = sae_io.save(sae, Store.open(str(tmp_path / name)), info={}, hook_name=HP)
    tab = pq.read_table(io.BytesIO(score_hookpoint(acts, y, train, urls, [1, 2], ["a", "b", "rare"], HP)))
    assert tab.schema.equals(SCHEMA)
    rows = tab.to_pylist()
    # 'rare' (6 positives) is not scored; a and b: per SAE 1 latent + 2 sparse rows, linear once
    assert {r["concept"] for r in rows} == {"a", "b"}
    lin = [r for r in rows if r["measure"] == "linear"]
    assert len(lin) == 2 and all(r["sae"] is None and r["k"] == 0 and r["latents"] == [] for r in lin)
    for name in urls:
        mine = [(r["measure"], r["k"], r["concept"]) for r in rows if r["sae"] == name]
        assert sorted(mine) == sorted((m, k, c) for m, k in (("latent", 1), ("sparse", 1), ("sparse", 2))
                                      for c in ("a", "b"))
    assert len(rows) == 2 + 2 * 6 and all(r["layer"] == 1 and r["hookpoint"] == HP for r in rows)
    assert all(r["auroc"] > 0.95 for r in lin)           # both concepts are linear in the activations
    # the emergence analysis reads one SAE and the linear probe
    one = of_sae(tab, "topk-w32-k4").to_pylist()
    assert len(one) == 2 + 6 and {r["sae"] for r in one} == {None, "topk-w32-k4"}


def _rows(concept: str, lin: float, latent: dict[str, float], sparse: dict[str, float], hp: str = HP) -> list[dict]:
    base = {"hookpoint": hp, "layer": int(hp.split(".")[1]), "concept": concept, "f1": 0.5,
            "positives_train": 20, "positives_test": 20}
    out = [{**base, "sae": None, "measure": "linear", "k": 0, "auroc": lin, "latents": []}]
    for s, v in latent.items():
        out.append({**base, "sae": s, "measure": "latent", "k": 1, "auroc": v, "latents": [7]})
    for s, v in sparse.items():
        out += [{**base, "sae": s, "measure": "sparse", "k": k, "auroc": v - 0.01 * (4 - k), "latents": list(range(k))}
                for k in (1, 4)]
    return out


def test_render_html_escapes_marks_misses_and_links_latents():
    evil = "<script>alert(1)</script>"
    rows = (_rows(evil, 0.97, {"topk": 0.6, "relu": 0.95}, {"topk": 0.7, "relu": 0.99})
            + _rows("plain", 0.95, {"topk": 0.93, "relu": 0.91}, {"topk": 0.96, "relu": 0.97})
            + _rows("unread", 0.6, {"topk": 0.55, "relu": 0.5}, {"topk": 0.58, "relu": 0.5}))
    seen = []

    def link(target, hp, sae, latent):
        seen.append((target, hp, sae, latent))
        return f"dash/{sae}.html#l{latent}&x=\"1\"" if sae == "topk" else None

    page = render_html({"m@main": rows}, link)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("class=miss") == 2                  # topk's latent (0.6) and k=4 probe (0.7) on the evil concept
    assert "unread" in page                                # shown, but not marked: the linear probe misses it too
    assert 'href="dash/topk.html#l7&amp;x=&quot;1&quot;"' in page and page.count("<a href") == 3
    assert ("m@main", HP, "relu", 7) in seen
    assert "k=4" in page and "topk" in page and "relu" in page
    srows, missed = summary_rows(rows)
    assert srows == [["topk", 1, 1, 2, 1], ["relu", 2, 2, 2, 0]]
    assert missed == {"topk": [evil], "relu": []}
    # a pyarrow table works the same; no rows, no section
    assert render_html({"m@main": pa.Table.from_pylist(rows, schema=SCHEMA)}, link) == page
    assert render_html({"m@main": []}) == ""


def test_read_tables_reads_finished_targets(tmp_path):
    run = Store.open(str(tmp_path / "run"))
    rows = _rows("a", 0.95, {"topk": 0.9}, {"topk": 0.92}) + _rows("a", 0.9, {"topk": 0.8}, {"topk": 0.85},
                                                                   hp="resid_post.0")
    t = run / "targets/m@main"
    for hp in (HP, "resid_post.0"):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["hookpoint"] == hp], schema=SCHEMA), buf)
        t.write_bytes(table_path(hp), buf.getvalue())
    done = {"status": "done", "result": {"saes": ["topk"], "hookpoints": ["resid_post.0", HP], "concepts": ["a"],
                                         "tokens": 40}}
    run.write_json("manifest.json", {"targets": {"m@main": {"stages": {"presence": done}},
                                                 "m@step8": {"stages": {"presence": {"status": "running"}}}}})
    summary = {"targets": [{"target": "m@main", "folder": "targets/m@main"},
                           {"target": "m@step8", "folder": "targets/m@step8"}]}
    got = read_tables(run, summary)
    assert list(got) == ["m@main"] and got["m@main"].num_rows == len(rows)
    assert got["m@main"].schema.equals(SCHEMA)
    # a table written before the sae column: its latent and sparse rows get the recorded SAE
    old = pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["sae"])
    buf = io.BytesIO()
    pq.write_table(old, buf)
    t.write_bytes(table_path(HP), buf.getvalue())
    back = read_presence(t, [HP], "topk-w8-k2").to_pylist()
    assert {(r["measure"], r["sae"]) for r in back} == {("linear", None), ("latent", "topk-w8-k2"),
                                                        ("sparse", "topk-w8-k2")}

"""`saeray export`: a run's dashboards as SAEDashboard's batch folder and as Neuronpedia's bulk-import
layout, checked on a handmade run folder (manifest in the real shape, two batch files): exactly
SAEDashboard's row fields, the batch files' own values, and the CLI's errors."""
from __future__ import annotations

import gzip
import json
import sys

import pytest

from saeray.dashboards.export import FALLBACK_CREATOR_ID, export_run, hook_name, neuronpedia_rows
from saeray.store import Store

TID, HP, SAE, WIDTH = "tiny@main", "resid_post.1", "topk-w8-k2", 8
SET = "resid_post-topk-w8-k2"
NOW = "2026-01-02T03:04:05.678Z"

# the fields of SAEDashboard's inlined neuronpedia-utils dataclasses (neuronpedia_export.py), in order
ACTIVATION = ["id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values",
              "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt",
              "lossValues", "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex",
              "zIndices", "zValues"]
FEATURE = ["modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
           "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
           "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
           "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
           "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
           "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
           "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
           "decoder_weights_dist", "sourceSetName"]
MODEL = ["id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension", "visibility",
         "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers", "neuronsPerLayer", "createdAt",
         "owner", "updatedAt", "website"]
SOURCE = ["id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts",
          "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
          "defaultOfModelId", "hasUmap", "hasUmapLogSparsity", "hasUmapClusters", "num_prompts",
          "num_tokens_in_prompt", "dataset", "notes", "createdAt"]
RELEASE = ["name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured",
           "descriptionShort", "urls", "creatorEmail", "creatorNameShort", "defaultSourceSetName", "defaultSourceId",
           "defaultUmapSourceIds", "createdAt"]
SOURCESET = ["modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type", "creatorName",
             "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange", "defaultShowBreaks",
             "showDfa", "showCorrelated", "showHeadAttribution", "showUmap", "createdAt"]


def _act(bin_min, bin_max, contains, tokens, values, q, doc):
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": contains, "tokens": tokens, "values": values,
            "qualifying_token_index": q, "doc": doc, "pos": q + 3}


def _feature(index, acts, neighbours=(1, 3)):
    return {
        "feature_index": index, "neuron_alignment_indices": [3, 0, 1], "neuron_alignment_values": [0.91234, -0.5, 0.1],
        "neuron_alignment_l1": [0.4, 0.2, 0.05], "correlated_neurons_indices": [], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [], "correlated_features_indices": [], "correlated_features_l1": [],
        "correlated_features_pearson": [], "pos_str": [" the", "<script>"], "pos_values": [1.23456, 0.98765],
        "neg_str": [" a", "é"], "neg_values": [-1.5, -0.25], "logits_hist_data_bar_heights": [1.0, 3.0],
        "logits_hist_data_bar_values": [-0.5, 0.5], "frac_nonzero": 0.0123457,
        "freq_hist_data_bar_values": [0.1, 0.30000000000000004], "freq_hist_data_bar_heights": [7.0, 2.0],
        "n_prompts_total": 64, "n_tokens_in_prompt": 32, "dataset": "storyworld", "decoder_weights_dist": [],
        "activations": acts,
        "saeray": {"n_fired": 9, "max_act": 0.5, "neighbours": list(neighbours), "neighbour_cos": [0.4321, -0.1],
                   "groups": ["all"]},
    }


def _header():
    return {"model_id": "tiny", "layer": 1, "sae_set": SET, "sae_id_suffix": None, "hook_point": HP, "sae": SAE,
            "target": TID, "dataset": "storyworld"}


BATCHES = [
    {**_header(), "features": [
        # latent 0: two top contexts, then samples from two lower intervals (one whose window holds a
        # value above the qualifying token's)
        _feature(0, [
            _act(-1.0, 0.5, -1.0, ["<script>", "alert", "(", "1", ")"], [0.0, 0.5, 0.0, 1e-05, 0.0], 1, 4),
            _act(-1.0, 0.5, -1.0, [" é", " x"], [0.49999, 0.0], 0, 9),
            _act(0.25, 0.5, 0.66667, [" a", " b", " c"], [0.3, 0.0, 0.30000000000000004], 0, 11),
            _act(0.0, 0.25, 0.33333, [" q", " r"], [0.4, 0.12345], 1, 12)]),
        _feature(2, [_act(-1.0, 0.07034, -1.0, [" z"], [0.07034], 0, 1)], neighbours=(0, 5)),
    ]},
    # latent 5: dead (in the "all" group, no context)
    {**_header(), "features": [_feature(5, [], neighbours=(2, 0))]},
]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the audit leaves it: one target with dashboards, one without."""
    run = tmp_path / "runs" / "demo"
    folder = f"targets/{TID}"
    rels = [f"dashboards/{HP}/{SAE}/batch-{k:04d}.json" for k in range(len(BATCHES))]
    for rel, b in zip(rels, BATCHES):
        p = run / folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(b, ensure_ascii=False))
    done = lambda result: {"status": "done", "wall_s": 1.0, "key": {}, "result": result}  # noqa: E731
    harvest = done({"hookpoints": ["mlp_post.1", HP], "widths": {"mlp_post.1": 64, HP: 16}, "rows": 100})
    manifest = {
        "run": "demo", "saeray_version": "0.1.0", "created": NOW, "updated": NOW, "spec_hash": "x",
        "spec": {"name": "demo", "corpus": {"source": "storyworld", "context_len": 32},
                 "dashboards": {"enabled": True, "all_up_to": 256, "top": 10, "batch_latents": 2}},
        "targets": {
            TID: {"model": "tiny", "revision": "main", "folder": folder, "stages": {
                "harvest": harvest,
                "train": done({"saes": {HP: {SAE: {"path": f"saes/{HP}/{SAE}", "arch": "topk", "width": WIDTH,
                                                    "k": 2}}}}),
                "dashboards": done({"saes": {HP: {SAE: {"width": WIDTH, "latents": 3, "batches": rels}}},
                                    "tokens": 2048})}},
            "tiny@step100": {"model": "tiny", "revision": "step100", "folder": "targets/tiny@step100",
                             "stages": {"harvest": harvest, "dashboards": {"status": "running"}}}},
        "stages": {},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _jsonl_gz(path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode()
    assert text == "" or text.endswith("\n")   # a batch of dead latents has no activation rows
    return [json.loads(line) for line in text.splitlines()]


def test_neuronpedia_export(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DEFAULT_CREATOR_ID", raising=False)
    res = export_run(Store.open(str(run_dir)), Store.open(str(tmp_path / "np")), "neuronpedia", created_at=NOW)
    src = tmp_path / "np" / "tiny" / f"1-{SET}"
    names = ["release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"] + \
        [f"{kind}/batch-{k}.jsonl.gz" for kind in ("features", "activations") for k in range(2)]
    assert all((src / n).is_file() for n in names)
    assert [r["target"] for r in res["saes"]] == [TID]                 # the target without dashboards is skipped
    assert (res["files"], res["features"], res["activations"]) == (len(names), 3, 5)
    assert res["saes"][0]["skipped"] == WIDTH - 3

    meta = {n: [json.loads(line) for line in (src / n).read_text().splitlines()] for n in names[:4]}
    for n, fields in zip(names[:4], (RELEASE, MODEL, SOURCESET, SOURCE)):
        assert len(meta[n]) == 1 and list(meta[n][0]) == fields, n
    rel, model, sset, source = (meta[n][0] for n in names[:4])
    assert rel["name"] == "demo" and rel["creatorId"] == FALLBACK_CREATOR_ID
    assert model["id"] == "tiny" and model["dimension"] == 16 and model["instruct"] is False   # d_model, not d_mlp
    assert sset["name"] == SET and sset["releaseName"] == "demo" and sset["visibility"] == "PUBLIC"
    assert source["id"] == f"1-{SET}" and source["setName"] == SET
    assert (source["num_prompts"], source["num_tokens_in_prompt"], source["dataset"]) == (64, 32, "storyworld")

    ids = set()
    for k, batch in enumerate(BATCHES):
        feats = _jsonl_gz(src / f"features/batch-{k}.jsonl.gz")
        acts = _jsonl_gz(src / f"activations/batch-{k}.jsonl.gz")
        assert [list(f) for f in feats] == [FEATURE] * len(batch["features"])
        assert all(list(a) == ACTIVATION for a in acts)
        want = [(f, a) for f in batch["features"] for a in f["activations"]]
        assert len(acts) == len(want)
        for row, (f, a) in zip(acts, want):
            assert row["index"] == str(f["feature_index"]) and row["layer"] == f"1-{SET}" and row["modelId"] == "tiny"
            assert row["tokens"] == a["tokens"] and row["values"] == a["values"]
            assert row["qualifyingTokenIndex"] == a["qualifying_token_index"]
            assert (row["binMin"], row["binMax"], row["binContains"]) == (a["bin_min"], a["bin_max"], a["bin_contains"])
            assert row["maxValue"] == max(a["values"]) and row["minValue"] == min(a["values"])
            assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"]
            assert row["createdAt"] == NOW and row["creatorId"] == FALLBACK_CREATOR_ID
            assert row["id"].startswith("c") and len(row["id"]) == 25
            ids.add(row["id"])
        for row, f in zip(feats, batch["features"]):
            mine = [a for a in acts if a["index"] == row["index"]]
            assert row["maxActApprox"] == (max(a["maxValue"] for a in mine) if mine else 0.0)
            assert row["topkCosSimIndices"] == f["saeray"]["neighbours"]
            assert row["topkCosSimValues"] == f["saeray"]["neighbour_cos"]
            assert row["hookName"] == "blocks.1.hook_resid_post" and row["sourceSetName"] == SET
            for key in FEATURE[13:-1]:
                assert row[key] == f[key], key
    assert len(ids) == 5
    assert "<script>" in gzip.decompress((src / "activations/batch-0.jsonl.gz").read_bytes()).decode()

    # the same numbers, as text: nothing re-rounded
    text = gzip.decompress((src / "activations/batch-0.jsonl.gz").read_bytes()).decode()
    assert "0.30000000000000004" in text and "1e-05" in text and "0.49999" in text


def test_saedashboard_export(run_dir, tmp_path):
    res = export_run(Store.open(str(run_dir)), Store.open(str(tmp_path / "sd")), "saedashboard", created_at=NOW)
    out = tmp_path / "sd" / f"tiny_{SET}_blocks.1.hook_resid_post_{WIDTH}"
    assert res["saes"][0]["dir"] == str(out) and res["files"] == 4
    src = run_dir / "targets" / TID / "dashboards" / HP / SAE
    for k in range(2):
        assert (out / f"batch-{k}.json").read_bytes() == (src / f"batch-{k:04d}.json").read_bytes()
    assert json.loads((out / "batch-0.json").read_text())["features"][0]["saeray"]["groups"] == ["all"]
    skipped = json.loads((out / "skipped_indexes.json").read_text())
    assert skipped["skipped_indexes"] == [1, 3, 4, 6, 7]
    assert (skipped["model_id"], skipped["layer"], skipped["sae_set"]) == ("tiny", "1", SET)
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["hook_point"] == HP and settings["hook_name"] == "blocks.1.hook_resid_post"
    assert settings["sae"] == SAE and settings["width"] == WIDTH and settings["model_id"] == "tiny"
    assert settings["dashboards"]["batch_latents"] == 2 and settings["sae_config"]["arch"] == "topk"


def test_creator_id_and_rows(monkeypatch):
    monkeypatch.setenv("DEFAULT_CREATOR_ID", "from-env")
    feats, acts = neuronpedia_rows(BATCHES[0], "opt", NOW)
    assert {r["creatorId"] for r in feats + acts} == {"opt"}
    assert feats[0]["hookName"] == "blocks.1.hook_resid_post"
    assert acts[3]["maxValueTokenIndex"] == 0 and acts[3]["qualifyingTokenIndex"] == 1   # as SAEDashboard: argmax
    from saeray.dashboards.export import resolve_creator_id

    assert resolve_creator_id(None) == "from-env" and resolve_creator_id("x") == "x"
    monkeypatch.delenv("DEFAULT_CREATOR_ID")
    assert resolve_creator_id(None) == FALLBACK_CREATOR_ID


@pytest.mark.parametrize("hp, name", [("resid_post.3", "blocks.3.hook_resid_post"),
                                      ("resid_pre.0", "blocks.0.hook_resid_pre"), ("mlp_out.2", "blocks.2.hook_mlp_out"),
                                      ("attn_out.1", "blocks.1.hook_attn_out"),
                                      ("mlp_post.4", "blocks.4.mlp.hook_post"), ("weird.5", "blocks.5.hook_weird")])
def test_hook_name(hp, name):
    assert hook_name(hp) == name


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from saeray.cli import main

    monkeypatch.setattr(sys, "argv", ["saeray", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli(run_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    code, _, err = _cli(monkeypatch, capsys, "export", str(empty), "--out", str(tmp_path / "x"))
    assert code == 2 and str(empty) in err and "manifest.json" in err

    m = json.loads((run_dir / "manifest.json").read_text())
    del m["targets"][TID]["stages"]["dashboards"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(m))
    code, _, err = _cli(monkeypatch, capsys, "export", str(bare), "--out", str(tmp_path / "x"))
    assert code == 2 and str(bare) in err and "dashboards" in err

    code, _, err = _cli(monkeypatch, capsys, "export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "html")
    assert code == 2 and "neuronpedia" in err

    code, out, _ = _cli(monkeypatch, capsys, "export", str(run_dir), "--out", str(tmp_path / "cli"),
                        "--creator-id", "me", "--json")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["format"] == "neuronpedia" and res["features"] == 3 and res["out"] == str(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "tiny" / f"1-{SET}" / "model.jsonl").read_text())["creatorId"] == "me"


def test_export_to_s3(run_dir, tmp_path, s3_url):
    """The output is written through the store: an s3:// folder holds the same bytes as a local one."""
    export_run(Store.open(str(run_dir)), Store.open(str(tmp_path / "local")), "neuronpedia", created_at=NOW)
    export_run(Store.open(str(run_dir)), Store.open(s3_url), "neuronpedia", created_at=NOW)
    s3, rel = Store.open(s3_url), f"tiny/1-{SET}"
    assert s3.ls(rel) == sorted(p.name for p in (tmp_path / "local" / rel).iterdir())
    for name in ("source.jsonl", "features/batch-0.jsonl.gz", "activations/batch-1.jsonl.gz"):
        assert s3.read_bytes(f"{rel}/{name}") == (tmp_path / "local" / rel / name).read_bytes()

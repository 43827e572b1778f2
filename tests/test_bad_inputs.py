"""Bad input, table-driven, through the real command line: every case must exit with its code (2 for
bad input), print one message naming the file or field at fault, print no traceback, and leave an
existing run (and an existing SAE folder) byte for byte as it was.

The run the audit cases point at is real: a harvest of the tiny model, in the store and under the
run name every bad spec names, so a failed start that wrote or deleted anything would show.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port


def snapshot(root: Path) -> dict[str, str]:
    """Every file and its hash, but the run's lease: a start refused after taking it (a finished stage
    asked for with other settings) releases it, which is the lease working, not the run changing."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "_lease" not in p.parts}


@pytest.fixture(scope="module")
def world(ray_local, tiny_model, tmp_path_factory):
    """An existing run (harvested), an existing trained SAE folder, activations and model variants."""
    from saeray.run.audit import open_run, run_targets
    from saeray.sae.run import train_on_activations
    from saeray.spec import parse_spec

    root = tmp_path_factory.mktemp("bad")
    store = root / "store"
    base = {"name": "existing", "model": {"name": tiny_model},
            "corpus": {"n_docs": 32, "context_len": 32, "heldout_docs": 8},
            "hookpoints": ["resid_post.1"], "harvest": {"batch_size": 16, "unit_contexts": 16},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    "train": {"tokens": 2000, "batch_size": 100}},
            "store": str(store), "resources": {"harvest": {"num_cpus": 0.5}}}
    run_targets(open_run(parse_spec(json.dumps(base))), ["harvest"])
    acts = store / "existing" / "targets" / "neox@main" / "acts" / "resid_post.1"
    assert any(acts.glob("*.parquet"))
    sae_out = root / "sae"
    train_on_activations(str(acts), "topk", 64, str(sae_out), k=4, tokens=1000, batch_size=100)

    def model_variant(name: str, edit) -> str:
        d = root / "models" / name
        shutil.copytree(tiny_model, d)
        edit(d)
        return str(d)

    def bin_only(d: Path) -> None:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def truncated(d: Path) -> None:
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])

    def no_tokenizer(d: Path) -> None:
        for f in d.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
                f.unlink()

    models = {
        "bin_only": model_variant("bin_only", bin_only),
        "truncated": model_variant("truncated", truncated),
        "no_tokenizer": model_variant("no_tokenizer", no_tokenizer),
        "bad_config": model_variant("bad_config", lambda d: (d / "config.json").write_text("{ not json")),
        "not_safetensors": model_variant("not_safetensors",
                                         lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64)),
        "remote_code": model_variant("remote_code", lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "model_type": "saeray_custom",
             "auto_map": {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}}))),
    }

    # activation folders: truncated, no act column, int acts, mixed widths
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(acts.glob("*.parquet"))

    def act_variant(name: str) -> str:
        d = root / "acts" / name
        d.mkdir(parents=True)
        for f in files:
            shutil.copy(f, d / f.name)
        return str(d)

    trunc = act_variant("truncated")
    f0 = sorted(Path(trunc).glob("*.parquet"))[0]
    f0.write_bytes(f0.read_bytes()[: f0.stat().st_size // 2])
    noact = root / "acts" / "noact"
    noact.mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0]}), noact / "a.parquet")
    intact = root / "acts" / "intact"
    intact.mkdir()
    pq.write_table(pa.table({"act": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2))}), intact / "a.parquet")
    mixed = act_variant("mixed")
    pq.write_table(pa.table({"act": pa.array([[1.0] * 7] * 4, pa.list_(pa.float32(), 7))}), Path(mixed) / "z.parquet")

    corpora = root / "corpora"
    corpora.mkdir()
    (corpora / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve r\xe9sum\xe9\n\n".encode("latin-1") * 200)
    (corpora / "empty").mkdir()
    (corpora / "nofield.jsonl").write_text("\n".join(json.dumps({"body": "the cat sat"}) for _ in range(50)))
    (corpora / "tiny.txt").write_text("the cat sat on the mat\n")
    (corpora / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")

    return {"root": root, "store": store, "base": base, "acts": str(acts), "sae": sae_out, "models": models,
            "trunc_acts": trunc, "trunc_file": f0.name, "noact": str(noact), "intact": str(intact), "mixed": mixed,
            "corpora": corpora}


def _spec(w, edit) -> dict:
    d = json.loads(json.dumps(w["base"]))
    edit(d)
    return d


def _set(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return edit


def _model(kind):
    return lambda w: _spec(w, lambda d: d["model"].update(name=w["models"][kind]))


def _corpus(name, **extra):
    return lambda w: _spec(w, lambda d: d["corpus"].update(source=str(w["corpora"] / name), **extra))


TRAIN = ["--arch", "topk", "--width", "64", "--k", "4", "--tokens", "1000", "--batch-size", "100"]

# (id, kind, what to run, exit code, regex the message must match)
#   kind "audit": the value is a function of the world returning the spec dict (written to a file)
#   kind "train": a function of the world returning the extra CLI args after `saeray train`
#   kind "cli":   a function of (world, spec file of the base spec) returning the whole argument list
CASES = [
    # the five a new user hit (issue 19)
    ("truncated_parquet", "train", lambda w: ["--activations", w["trunc_acts"], "--out", str(w["root"] / "o1"), *TRAIN],
     2, r"not a readable Parquet file"),
    ("corpus_not_utf8", "audit", _corpus("latin1.txt"), 2, r"latin1\.txt: not utf-8 text .*corpus\.encoding"),
    ("s3_unreachable_no_credentials", "audit",
     lambda w: _spec(w, _set("store", {"url": "s3://saeray-nowhere/runs",
                                       "endpoint_url": f"http://127.0.0.1:{w['dead_port']}"})),
     2, r"store: no S3 credentials were found for s3://saeray-nowhere/runs/existing .*store\.key"),
    ("pickled_weights_only", "audit", _model("bin_only"), 2, r"pickled weights .* never unpickles"),
    ("truncated_safetensors", "audit", _model("truncated"), 2, r"model\.safetensors: .*truncated"),
    # model
    ("model_missing", "audit", lambda w: _spec(w, lambda d: d["model"].update(name=str(w["root"] / "nope"))),
     2, r"model\.name: .*nope.* does not exist"),
    ("no_tokenizer", "audit", _model("no_tokenizer"), 2, r"no_tokenizer.*ships no tokenizer"),
    ("config_not_json", "audit", _model("bad_config"), 2, r"bad_config.: cannot read its config\.json"),
    ("weights_not_safetensors", "audit", _model("not_safetensors"), 2,
     r"model\.safetensors: not a safetensors file"),
    ("remote_code_not_trusted", "audit", _model("remote_code"), 2, r"trust_remote_code"),
    ("revision_missing", "audit", lambda w: _spec(w, lambda d: d["model"].update(revisions=["step7"])),
     2, r"revision 'step7'"),
    ("dtype_unknown", "audit", lambda w: _spec(w, lambda d: d["model"].update(dtype="float8")), 2, r"model\.dtype"),
    # corpus
    ("corpus_empty_folder", "audit", _corpus("empty"), 2, r"corpus\.source .*no \.txt/\.jsonl/\.parquet files"),
    ("corpus_field_missing", "audit", _corpus("nofield.jsonl"), 2, r"nofield\.jsonl:1: no field 'text'.*text_field"),
    ("corpus_too_small", "audit", _corpus("tiny.txt"), 2, r"corpus\.source .*holds 0 contexts"),
    ("corpus_parquet_broken", "audit", _corpus("broken.parquet"), 2, r"broken\.parquet: not a readable Parquet"),
    ("corpus_encoding_unknown", "audit", _corpus("latin1.txt", encoding="klingon"), 2,
     r"corpus\.encoding: unknown text encoding 'klingon'"),
    # hook points, harvest, SAEs
    ("hookpoint_out_of_range", "audit", lambda w: _spec(w, _set("hookpoints", ["resid_post.9"])), 2,
     r"hookpoints .*resid_post\.9"),
    ("hookpoint_bad_syntax", "audit", lambda w: _spec(w, _set("hookpoints", ["resid_post"])), 2, r"hookpoints\[0\]"),
    ("too_many_stages", "audit", lambda w: _spec(w, _set("harvest.stages", 9)), 2, r"harvest\.stages"),
    ("k_above_width", "audit", lambda w: _spec(w, _set("sae.architectures", [{"arch": "topk", "width": 8, "k": 9}])),
     2, r"sae\.architectures\[0\].*k=9 is larger than width=8"),
    ("unknown_key", "audit", lambda w: _spec(w, _set("harvest.batchsize", 3)), 2, r"harvest\.batchsize"),
    ("env_placeholder_unset", "audit",
     lambda w: _spec(w, _set("store", {"url": str(w["store"]), "secret": "${SAERAY_TEST_UNSET_VAR}"})),
     2, r"store\.secret: environment variable SAERAY_TEST_UNSET_VAR is not set"),
    ("alerts_without_series", "audit", lambda w: _spec(w, _set("alerts", {"fvu_rise": 0.1})), 2, r"alerts"),
    ("store_scheme_unknown", "audit", lambda w: _spec(w, _set("store", "gs://bucket/x")), 2, r"store.*gs://"),
    # the command line
    ("spec_missing", "cli", lambda w, spec: ["audit", str(w["root"] / "missing.yaml")], 2, r"missing\.yaml"),
    ("spec_not_yaml", "cli", lambda w, spec: ["audit", str(_write(w, "broken.yaml", "name: [unclosed\n"))], 2,
     r"broken\.yaml:\d+: not valid YAML"),
    ("spec_python_tag", "cli", lambda w, spec: ["audit", str(_write(
        w, "tag.yaml", "name: !!python/object/apply:os.system ['touch " + str(w["root"] / "pwned") + "']\n"))],
     2, r"tag\.yaml:1: not valid YAML"),
    ("run_name_escapes", "cli", lambda w, spec: ["audit", str(spec), "--run-name", "../elsewhere"], 2,
     r"--run-name: '\.\./elsewhere' may hold only"),
    ("date_not_a_date", "cli", lambda w, spec: ["audit", str(spec), "--date", "2026-13-40"], 2, r"--date"),
    # saeray train
    ("activations_missing", "train", lambda w: ["--activations", str(w["root"] / "none"), "--out",
                                                str(w["root"] / "o2"), *TRAIN], 2, r"none: no such folder"),
    ("activations_no_act_column", "train", lambda w: ["--activations", w["noact"], "--out", str(w["root"] / "o3"),
                                                      *TRAIN], 2, r"a\.parquet: no 'act' column"),
    ("activations_not_float", "train", lambda w: ["--activations", w["intact"], "--out", str(w["root"] / "o4"),
                                                  *TRAIN], 2, r"a\.parquet: column 'act' must be a fixed_size_list of floats"),
    ("activations_mixed_widths", "train", lambda w: ["--activations", w["mixed"], "--out", str(w["root"] / "o5"),
                                                     *TRAIN], 2, r"z\.parquet: activations of width 7"),
    ("train_k_above_width", "train", lambda w: ["--activations", w["acts"], "--out", str(w["root"] / "o6"),
                                                "--arch", "topk", "--width", "4", "--k", "9"], 2,
     r"k=9 must be above 0 and at most the width 4"),
    ("train_htf_not_gba", "train", lambda w: ["--activations", w["acts"], "--out", str(w["root"] / "o8"),
                                              "--arch", "topk", "--width", "64", "--k", "4", "--htf", "0.01"], 2,
     r"architecture 'topk' takes no htf; htf and ltf set GBA's target-frequency range"),
    ("train_k_aux_not_auxk", "train", lambda w: ["--activations", w["acts"], "--out", str(w["root"] / "o9"),
                                                 "--arch", "relu", "--width", "64", "--l1", "1", "--k-aux", "2"], 2,
     r"architecture 'relu' takes no k_aux; k_aux sizes the AuxK loss of batchtopk and topk"),
    ("train_arch_unknown", "train", lambda w: ["--activations", w["acts"], "--out", str(w["root"] / "o7"),
                                               "--arch", "nope", "--width", "64"], 2,
     r"unknown SAE architecture 'nope'"),
    ("train_out_other_settings", "train", lambda w: ["--activations", w["acts"], "--out", str(w["sae"]),
                                                     "--arch", "topk", "--width", "64", "--k", "4", "--tokens", "1000",
                                                     "--batch-size", "50"], 2, r"checkpoint has batch_size=100"),
    ("train_bucket_name_invalid", "train", lambda w: ["--activations", w["acts"], "--out", "s3://Bad_Bucket/x",
                                                      *TRAIN], 2, r"Bad_Bucket.*not a valid S3 bucket name"),
]


def _write(w, name: str, text: str) -> Path:
    p = w["root"] / name
    p.write_text(text)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case, tmp_path):
    name, kind, make, code, pattern = case
    w = dict(world, dead_port=free_port())
    base_file = tmp_path / "base.yaml"
    base_file.write_text(yaml.safe_dump(w["base"]))
    if kind == "audit":
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(make(w)))
        args = ["audit", str(spec_file)]
    elif kind == "train":
        args = ["train", *make(w)]
    else:
        args = make(w, base_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    empty = tmp_path / "empty-aws"
    empty.write_text("")
    # no credentials anywhere: the S3 case must say so, not raise botocore's NoCredentialsError
    env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_EC2_METADATA_DISABLED="true",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    before_run, before_sae = snapshot(w["store"]), snapshot(w["sae"])
    p = subprocess.run([sys.executable, "-m", "saeray", *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    out = p.stdout + p.stderr
    art = Path(os.environ.get("SAERAY_ARTIFACTS") or REPO / "test-artifacts") / "bad-inputs"
    art.mkdir(parents=True, exist_ok=True)
    (art / f"{name}.txt").write_text(f"$ saeray {' '.join(args)}\nexit {p.returncode}\n{p.stderr}")
    assert p.returncode == code, f"{name}: exit {p.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, f"{name}: a traceback\n{out[-3000:]}"
    import re

    assert re.search(pattern, out, re.S), f"{name}: message does not match {pattern!r}:\n{out[-3000:]}"
    assert snapshot(w["store"]) == before_run, f"{name}: the existing run changed"
    assert snapshot(w["sae"]) == before_sae, f"{name}: the existing SAE folder changed"
    assert not (w["root"] / "pwned").exists() and not (w["root"].parent / "elsewhere").exists()


def test_at_least_25_cases_and_the_five_reported():
    ids = {c[0] for c in CASES}
    assert len(ids) == len(CASES) >= 25
    assert {"truncated_parquet", "corpus_not_utf8", "s3_unreachable_no_credentials", "pickled_weights_only",
            "truncated_safetensors"} <= ids


def test_traceback_only_at_debug(tmp_path):
    """Bad input and an unexpected failure each print one message (exit 2 and 1); --log-level debug
    adds the traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")      # not bad usage: a run folder damaged by hand
    for folder, code, want in ((tmp_path / "nope", 2, "no manifest.json"), (broken, 1, "JSONDecodeError")):
        for extra, want_tb in (([], False), (["--log-level", "debug"], True)):
            p = subprocess.run([sys.executable, "-m", "saeray", *extra, "report", str(folder)],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
            assert p.returncode == code and want in p.stderr, p.stderr[-2000:]
            assert ("Traceback" in p.stderr) == want_tb, p.stderr[-2000:]


def test_errors_raised_inside_ray_keep_their_exit_code(ray_local):
    """An InputError raised in a Ray task comes back wrapped in RayTaskError: the CLI still finds
    it (exit 2, its own message); any other worker error is shown without Ray's remote traceback."""
    import ray

    from saeray.cli import _cause
    from saeray.errors import InputError

    @ray.remote
    def bad(kind):
        if kind == "input":
            raise InputError("corpus.source: the message")
        raise ValueError("something else")

    with pytest.raises(Exception) as e:
        ray.get(bad.remote("input"))
    root = _cause(e.value)
    assert isinstance(root, InputError) and root.exit_code == 2 and str(root) == "corpus.source: the message"
    with pytest.raises(Exception) as e:
        ray.get(bad.remote("other"))
    root = _cause(e.value)
    assert type(root) is ValueError and str(root) == "something else"

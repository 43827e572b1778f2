"""Security: secrets stay secret, names stay inside the run folder, specs and model folders cannot
run code.

* Canary: store credentials given as ``${ENV}`` placeholders and as literals, and a webhook URL with
  a token, appear in no log line (INFO and DEBUG, saeray's and Ray's), no object in the bucket, no
  webhook body, no local file and no error message of a nightly storyworld series on S3 (moto).
* Path escapes: run, spec, model, hook point and sweep names that could leave the store folder are
  refused with exit 2 before anything is written; Store paths refuse them too.
* A YAML spec with Python object tags is refused, and nothing in it runs.
* A model folder needing custom code is refused unless the spec sets ``trust_remote_code``; a folder
  with only pickled weights is refused; neither ever runs the code it carries.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, WebhookReceiver
from saeray.errors import InputError
from saeray.store import Store, check_rel


def saeray(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600) -> tuple[int, str, str]:
    r = subprocess.run([str(VENV_BIN / "saeray"), *args], env=env or dict(os.environ), cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size (what "nothing written" is checked against)."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def tiny_spec(model: str, store: str | dict, name: str = "sec", **over) -> dict:
    return {"name": name, "model": {"name": model},
            "corpus": {"n_docs": 32, "context_len": 64, "heldout_docs": 16},
            "hookpoints": ["resid_post.1"],
            "harvest": {"batch_size": 16, "unit_contexts": 16},
            "sae": {"architectures": [{"arch": "topk", "width": 64, "k": 4}],
                    "train": {"tokens": 4000, "batch_size": 200, **over.pop("train", {})}},
            "evaluation": {"batch_size": 16, "probes": False}, "dashboards": {"enabled": False},
            "store": store, "resources": {k: {"num_cpus": 0.5} for k in ("harvest", "train", "eval")}, **over}


# ---- canary --------------------------------------------------------------------------------------

def _texts(data: bytes) -> list[bytes]:
    """``data`` and what it decodes to: gzip'd bytes unpacked, a Parquet file's rows as JSON (its pages
    may be compressed, so the raw bytes alone would hide a string)."""
    out = [data]
    if data[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(data))
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        t = pq.read_table(io.BytesIO(data))
        out.append(json.dumps(t.to_pylist(), default=str).encode())
        out.append(json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                               for k, v in (t.schema.metadata or {}).items()}).encode())
    return out


def _leaks(canaries: list[str], where: str, data: bytes) -> list[str]:
    return [f"{c!r} in {where}" for c in canaries for t in _texts(data) if c.encode() in t]


def _second_checkpoint(path: Path) -> None:
    """Another random tiny GPT-NeoX (a newer 'checkpoint'): its SAEs differ, so the night alerts."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from saeray.storyworld.tokenizer import save_tokenizer, vocab_size

    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=vocab_size(), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    save_tokenizer(path)


@pytest.mark.slow
def test_canary_secrets_appear_in_no_artefact(tiny_model, moto_endpoint, tmp_path):
    import boto3

    tag = uuid.uuid4().hex[:10]
    key, secret, hook_token, literal = (f"AKCANARY{tag.upper()}", f"canary-secret-{tag}", f"canary-hook-{tag}",
                                        f"canary-literal-{tag}")
    canaries = [key, secret, hook_token, literal]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"canary-{tag}"
    s3.create_bucket(Bucket=bucket)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step1").symlink_to(tiny_model)
    hook = WebhookReceiver()
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")      # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "CANARY_KEY": key, "CANARY_SECRET": secret, "RAY_TMPDIR": ray_tmp,
           "SAERAY_OBJECT_STORE_BYTES": str(256 << 20),
           "SAERAY_ALERT_WEBHOOK": f"http://127.0.0.1:{hook.server.server_address[1]}/hooks/{hook_token}?token={hook_token}"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"     # the CLI's working folder: anything it writes locally lands here
    work.mkdir()
    spec = tiny_spec(str(ckpts), {"url": f"s3://{bucket}/runs", "key": "${CANARY_KEY}", "secret": "${CANARY_SECRET}"},
                     name="nightly", series={"match_threshold": 0.95}, alerts={"matched_share_below": 1.0})
    spec["model"]["revisions"] = ["latest"]
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(spec))
    lit = tiny_spec(tiny_model, {"url": f"s3://{bucket}/runs", "key": f"AKLIT{tag.upper()}", "secret": literal},
                    name="lit", train={"launcher": "task"})
    (tmp_path / "lit.yaml").write_text(yaml.safe_dump(lit))
    canaries.append(f"AKLIT{tag.upper()}")
    outputs: dict[str, str] = {}
    try:
        rc, out, err = saeray("audit", str(tmp_path / "nightly.yaml"), "--date", "2026-12-01", "--json", env=env, cwd=work)
        outputs["night 1"] = out + err
        assert rc == 0, err[-3000:]
        _second_checkpoint(ckpts / "step2")
        rc, out, err = saeray("--log-level", "debug", "audit", str(tmp_path / "nightly.yaml"), "--date", "2026-12-02",
                              "--json", env=env, cwd=work)
        outputs["night 2 (debug)"] = out + err
        assert rc == 3 and "ALERT matched_share_below" in err, err[-3000:]
        assert len(hook.posts) == 1                       # the webhook path ran
        assert " DEBUG " in err                           # and the debug log was on
        rc, out, err = saeray("audit", str(tmp_path / "lit.yaml"), "--json", env=env, cwd=work)
        outputs["literal credentials"] = out + err
        assert rc == 0, err[-3000:]
        for f in ("nightly.yaml", "lit.yaml"):
            rc, out, err = saeray("validate", str(tmp_path / f), env=env, cwd=work)
            outputs[f"validate {f}"] = out + err
            assert rc == 0 and ("<redacted>" in out) == (f == "lit.yaml"), err
        # failing runs with the canary credentials: a bucket that does not exist, an endpoint that refuses
        # (DEBUG prints the traceback: where a secret in an exception or a local would show)
        for what, level, store in (
                ("no bucket", "INFO", {"url": f"s3://nope-{tag}/runs"}),
                ("no bucket", "DEBUG", {"url": f"s3://nope-{tag}/runs"}),
                ("refused", "DEBUG", {"url": f"s3://{bucket}/runs", "endpoint_url": "http://127.0.0.1:9", "retries": 1})):
            bad = tiny_spec(tiny_model, {**store, "key": "${CANARY_KEY}", "secret": literal}, name="bad")
            (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
            rc, out, err = saeray("--log-level", level, "audit", str(tmp_path / "bad.yaml"), env=env, cwd=work,
                                  timeout=300)
            outputs[f"failing run ({what}, {level})"] = out + err
            assert rc in (1, 2) and "error:" in err, err[-3000:]
    except BaseException:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        raise
    finally:
        hook.close()

    leaks: list[str] = []
    for where, text in outputs.items():
        leaks += _leaks(canaries, f"output of {where}", text.encode())
    for _, body in hook.posts:
        leaks += _leaks(canaries, "webhook body", json.dumps(body).encode())
    n_objects = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            n_objects += 1
            leaks += _leaks(canaries, f"s3://{bucket}/{obj['Key']}", obj["Key"].encode())
            leaks += _leaks(canaries, f"s3://{bucket}/{obj['Key']}",
                            s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    n_logs = 0
    for root in (Path(ray_tmp), work):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                n_logs += 1
                leaks += _leaks(canaries, str(p), p.read_bytes())
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # the test saw what it claims to cover: both runs' objects, reports and Ray's own session logs
    assert n_objects > 50 and n_logs > 10, (n_objects, n_logs)
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])]
    assert any(k.endswith("report/index.html") for k in keys) and any(k.endswith("manifest.json") for k in keys)
    assert any("/_ray_train/" in k for k in keys) and any(k.endswith("diff/previous.json") for k in keys)
    assert not leaks, "\n".join(leaks[:20])


# ---- path escapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["..", ".", "a/../..", "../x", "~root", "s3:", "c:x", "a\\b", "x\x00", "a//b"])
def test_store_paths_refuse_parts_that_leave_the_folder(part, tmp_path):
    s = Store.open(str(tmp_path / "store"))
    with pytest.raises(InputError, match="could leave the store folder"):
        check_rel(part)
    with pytest.raises(InputError, match="could leave the store folder"):
        s.write_bytes(f"{part}/f", b"x")
    with pytest.raises(InputError):
        s / part
    assert tree(tmp_path) == {}


def test_store_paths_accept_ordinary_names():
    assert check_rel("/targets/neox@main/saes/resid_post.1/topk-w64-k4/") == "targets/neox@main/saes/resid_post.1/topk-w64-k4"
    assert check_rel("a..b/x.y=z") == "a..b/x.y=z"


ESCAPES = [
    (["--run-name", "../x"], {}, "--run-name"),
    (["--run-name", "/abs/x"], {}, "--run-name"),
    (["--run-name", "s3://other/x"], {}, "--run-name"),
    (["--run-name", "a/b"], {}, "--run-name"),
    (["--run-name", ".."], {}, "--run-name"),
    ([], {"name": "../x"}, "name"),
    ([], {"name": "a/b"}, "name"),
    ([], {"name": "/abs"}, "name"),
    ([], {"model": {"name": "../../etc"}}, "model.name"),
    ([], {"model": {"name": "evil/../../../../x"}}, "evil/../../../../x"),
    ([], {"hookpoints": ["../resid_post.1"]}, "hookpoints"),
    ([], {"hookpoints": ["resid_post.1/../../x"]}, "hookpoints"),
    ([], {"model": {"name": "MODEL", "revisions": ["../main"]}}, "revisions"),
    ([], {"sweeps": [{"name": "../g", "prompts": ["q.jsonl"]}]}, "sweeps"),
]


def cli_in_process(args: list[str], capsys, monkeypatch, cwd: Path) -> tuple[int, str]:
    """``saeray *args`` through the CLI's own entry point in this process (the refusals under test come
    before Ray or a model would start; a subprocess per case would only add a torch import each)."""
    import sys

    from saeray.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["saeray", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,over,named", ESCAPES, ids=[f"{i}-{a[1] if a else next(iter(o))}"
                                                           for i, (a, o, _) in enumerate(ESCAPES)])
def test_names_that_would_leave_the_run_folder_are_refused(args, over, named, tiny_model, tmp_path, capsys,
                                                           monkeypatch):
    d = tiny_spec(tiny_model, str(tmp_path / "store"))
    for k, v in over.items():
        d[k] = v
    if d["model"]["name"] == "MODEL":
        d["model"]["name"] = tiny_model
    cwd = tmp_path / "cwd" / "deep"
    cwd.mkdir(parents=True)
    (cwd / "q.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    before = tree(tmp_path)
    rc, err = cli_in_process(["audit", str(tmp_path / "spec.yaml"), *args], capsys, monkeypatch, cwd)
    assert rc == 2, err[-2000:]
    assert err.startswith("error:") and named in err and "Traceback" not in err, err[-2000:]
    assert tree(tmp_path) == before            # nothing written: no store folder, nothing beside it


def test_a_refused_name_is_refused_by_the_real_cli_too(tiny_model, tmp_path):
    """The same refusal through the installed ``saeray`` entry point, as a user runs it."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(tiny_model, str(tmp_path / "store"))))
    before = tree(tmp_path)
    rc, out, err = saeray("audit", str(tmp_path / "spec.yaml"), "--run-name", "../escaped", cwd=tmp_path)
    assert rc == 2 and err.startswith("error: --run-name: '../escaped'") and "Traceback" not in err, err
    assert tree(tmp_path) == before and not (tmp_path.parent / "escaped").exists()


# ---- YAML, remote code, pickles ------------------------------------------------------------------

@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch {m}"]',
    '!!python/object/new:os.system ["touch {m}"]',
    '!!python/name:os.system',
    '!!python/module:os',
])
def test_yaml_object_tags_are_refused_and_never_run(tag, tmp_path):
    marker = tmp_path / "pwned"
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: {tag.format(m=marker)}
        model: {{name: storyworld-4l}}
        hookpoints: [resid_post.1]
        store: {tmp_path / "store"}
        """))
    for cmd in ("validate", "audit"):
        rc, out, err = saeray(cmd, str(spec))
        assert rc == 2 and "not valid YAML" in err and str(spec) in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "store").exists()


def _evil_model_folder(tiny_model: str, folder: Path, marker: Path, auto_map: bool) -> None:
    shutil.copytree(tiny_model, folder)
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    (folder / "evil_config.py").write_text(code + "from transformers import GPTNeoXConfig\n"
                                           "class EvilConfig(GPTNeoXConfig):\n    model_type = 'evilgpt'\n")
    (folder / "evil_model.py").write_text(code + "from transformers import GPTNeoXForCausalLM\n"
                                          "class EvilModel(GPTNeoXForCausalLM):\n    pass\n")
    if auto_map:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "evilgpt"     # not a built-in architecture: only the folder's own code could load it
        cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
        (folder / "config.json").write_text(json.dumps(cfg))


def test_custom_code_needs_trust_remote_code_and_never_runs_without(tiny_model, tmp_path):
    marker = tmp_path / "imported"
    folder = tmp_path / "evil"
    _evil_model_folder(tiny_model, folder, marker, auto_map=True)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(str(folder), str(tmp_path / "store"))))
    rc, out, err = saeray("audit", str(tmp_path / "spec.yaml"), cwd=tmp_path)
    assert rc == 2 and "trust_remote_code: true" in err and str(folder) in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists() and not (tmp_path / "store").exists()
    # the folder's code is real and would run: loading it with trust_remote_code on imports it
    from saeray.models.load import load_config

    with pytest.raises(InputError, match="unsupported model architecture 'evilgpt'"):   # imported, then not a family saeray reads
        load_config(str(folder), trust_remote_code=True)
    assert marker.exists()


class _Unpickled:
    """Creates the marker file if anything ever unpickles it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_refused_and_never_unpickled(tiny_model, tmp_path):
    import torch

    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for p in folder.glob("*.safetensors"):
        p.unlink()
    torch.save({"gpt_neox.embed_in.weight": torch.zeros(2, 2), "evil": _Unpickled(str(marker))},
               folder / "pytorch_model.bin")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(str(folder), str(tmp_path / "store"))))
    rc, out, err = saeray("audit", str(tmp_path / "spec.yaml"), cwd=tmp_path)
    assert rc == 2 and "holds only pickled weights" in err and str(folder) in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists() and not (tmp_path / "store").exists()

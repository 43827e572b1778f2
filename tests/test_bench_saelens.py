"""`saeray bench saelens`: the bench-venv helper (pinned torch, reuse, never a saeray dependency),
the CLI command, and (slow, only where the bench venv already exists) a tiny end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saeray.bench import saelens_env as se
from saeray.cli import app
from saeray.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _cons(tmp_path, text):
    p = tmp_path / "c.txt"
    p.write_text(text)
    return p


def test_pip_command_pins_torch_to_this_environment(tmp_path):
    tv = se.torch_version()
    assert tv == torch.__version__.split("+")[0]          # "2.13.0+cpu" -> "2.13.0"
    reqs = se.requirements(tv)
    cons = _cons(tmp_path, se.constraints_text(tv))
    cmd = se.pip_install_cmd("/v/bin/python", reqs, cons)
    assert cmd[:4] == ["/v/bin/python", "-m", "pip", "install"]
    assert cmd[cmd.index("-c") + 1] == str(cons)
    assert f"torch=={tv}" in cmd and se.SAELENS_REQ in cmd
    assert [r for r in cmd if r.startswith("torch")] == [f"torch=={tv}"]
    assert f"torch=={tv}" in cons.read_text().splitlines()


@pytest.mark.parametrize("bad", ["torch", "torch>=2.4", "torch<=2.14", "torch~=2.13", "torch==2.*", "Torch", "torch[cuda]"])
def test_unpinned_torch_is_refused(tmp_path, bad):
    cons = _cons(tmp_path, "torch==2.13.0\n")
    with pytest.raises(InputError, match="pinned exactly"):
        se.pip_install_cmd("python", [bad, "sae-lens"], cons)
    with pytest.raises(InputError, match="pinned exactly"):       # in the constraints file too
        se.pip_install_cmd("python", ["torch==2.13.0", "sae-lens"], _cons(tmp_path, f"# c\n{bad}\n"))


def test_torch_must_be_pinned_somewhere(tmp_path):
    with pytest.raises(InputError, match="must pin torch"):
        se.pip_install_cmd("python", ["torch==2.13.0", "sae-lens"], _cons(tmp_path, "numpy\n"))
    with pytest.raises(InputError, match="exact torch"):       # sae-lens alone would drag in the newest torch
        se.pip_install_cmd("python", ["sae-lens"], _cons(tmp_path, "torch==2.13.0\n"))
    # exact pins with a local tag are fine; a different package named torch-something is not torch
    se.pip_install_cmd("python", ["torch==2.13.0+cpu", "torch-geometric>=2"], _cons(tmp_path, "torch==2.13.0\n"))


def test_ready_venv_is_reused_without_pip(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    reqs = se.requirements(se.torch_version())
    (venv / se.STAMP).write_text(se.stamp_key(reqs) + "\n")

    def no_subprocess(*a, **k):
        raise AssertionError(f"a ready venv must not run anything: {a}")
    monkeypatch.setattr(se.subprocess, "run", no_subprocess)
    assert se.ensure_env(venv) == venv / "bin" / "python"
    # a stamp for other requirements (another sae-lens range) is not ready: it would reinstall
    assert not se.is_ready(venv, se.requirements(se.torch_version(), "sae-lens==6.0.0"))
    assert se.stamp_key(reqs) != se.stamp_key(se.requirements("2.12.0"))


def test_default_venv_is_in_the_checkout_and_git_ignored(monkeypatch):
    monkeypatch.delenv(se.VENV_ENV, raising=False)
    assert se.source_root() == REPO and (REPO / "saeray" / "__init__.py").exists()
    assert se.default_venv() == REPO / ".bench" / "saelens-venv"
    r = subprocess.run(["git", "check-ignore", "-q", ".bench/saelens-venv/bin/python"], cwd=REPO)
    assert r.returncode == 0
    monkeypatch.setenv(se.VENV_ENV, "/somewhere/else")
    assert se.default_venv() == Path("/somewhere/else")


def test_side_runs_this_checkout():
    env = se.side_env({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/x"]
    assert env["WANDB_MODE"] == "disabled" and env["HF_HUB_OFFLINE"] == "1"
    assert se.side_cmd("/v/bin/python", ["--out", "o"]) == ["/v/bin/python", "-m", "saeray.bench.saelens_side", "--out", "o"]


def test_saelens_is_not_a_saeray_dependency():
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = proj["dependencies"] + [d for ds in proj.get("optional-dependencies", {}).values() for d in ds]
    assert not [d for d in deps if se._req_name(d) in ("sae-lens", "transformer-lens")]


def test_cli_command_exists_and_checks_input_before_installing(tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["bench", "saelens", "--help"])
    assert r.exit_code == 0
    for opt in ("--json", "--out", "--tokens", "--threads", "--venv", "--archs"):
        assert opt in r.output
    venv = tmp_path / "venv"
    monkeypatch.setattr(se, "ensure_env", lambda *a, **k: pytest.fail("installed before checking input"))
    for argv in (["--archs", "topk,nope"], ["--k", "300", "--features", "256"], ["--l1", "topk=1"],
                 ["--archs", "topk", "--htf", "0.3"], ["--htf", "0.01", "--ltf", "0.05"], ["--htf", "1.5"]):
        r = subprocess.run([sys.executable, "-m", "saeray", "bench", "saelens", "--venv", str(venv), *argv],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert not venv.exists()


def test_l1_coefficients():
    assert se.parse_l1("") == se.DEFAULT_L1 == {"relu": 1.0, "gated": 1.0, "jumprelu": 0.03}
    assert se.parse_l1(" relu=0.3, jumprelu=1e-2 ") == {"relu": 0.3, "gated": 1.0, "jumprelu": 0.01}
    for bad, msg in (("topk=1", "ARCH=VALUE"), ("relu", "ARCH=VALUE"), ("relu=x", "not a number"),
                     ("gated=-1", ">= 0"), ("relu=nan", ">= 0")):
        with pytest.raises(InputError, match=msg):
            se.parse_l1(bad)


def test_replay_hands_out_the_stream_in_order():
    from saeray.bench.saelens_side import _Identity, _Replay, format_table

    x = torch.arange(20.0).view(10, 2)
    rp = _Replay(x)
    assert torch.equal(rp(4), x[:4]) and torch.equal(rp.sample(4), x[4:8]) and rp.i == 8
    with pytest.raises(RuntimeError, match="more than"):
        rp(4)
    assert torch.equal(_Identity(torch.zeros(3, 2))(x), x)
    row = {"name": "saeray-topk", "mcc": 0.5, "explained_variance": 0.7, "uniqueness": 0.8, "sae_l0": 4.0,
           "dead_latents": 3, "f1": 0.4, "shrinkage": 0.9, "tokens_per_s": 12345.0,
           "roundtrip": {"recon_max_abs_diff": 1e-7, "latents_max_abs_diff": 2e-7, "active_mismatch_frac": 0.0}}
    res = {"versions": {"sae_lens": "6.54.12"}, "machine": {"threads": 1},
           "data": {"config": {"num_features": 32, "hidden_dim": 16}, "true_l0": 2.5},
           "train": {"width": 32, "k": 2, "tokens": 8192, "batch_size": 1024}, "rows": [row], "out": "/o"}
    t = format_table(res)
    assert "saeray-topk" in t and "12,345" in t and "0.500" in t and "6.54.12" in t


@pytest.mark.slow
def test_bench_saelens_end_to_end(tmp_path):
    """The whole command, SAELens included. Where the bench venv does not exist yet (a clean CI
    clone) the command installs it first, as a user's first call does: a few minutes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "saeray", "--log-level", "WARNING", "bench", "saelens", "--out", str(out),
           "--tokens", "8192", "--features", "32", "--dim", "16", "--eval-samples", "2000",
           "--archs", "topk,gba,gated", "--htf", "0.3", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert any(ln.startswith("saeray-gba") for ln in lines[:-1])       # the table came first
    assert res == json.loads((out / "result.json").read_text()) and res["out"] == str(out)
    assert res["versions"]["sae_lens"].startswith("6.") and res["machine"]["threads"] == 1
    d, t = res["data"], res["train"]
    assert d["config"]["num_features"] == 32 and d["config"]["hidden_dim"] == 16 and d["tokens"] == t["tokens"] == 8192
    assert t["k"] == max(1, round(d["true_l0"])) and t["width"] == 32
    rows = {x["name"]: x for x in res["rows"]}
    assert list(rows) == ["saelens-topk", "saeray-topk", "saeray-gba-htf0.3", "saeray-gated"]
    # --htf reached the GBA that trained (and only GBA); ltf kept its default
    assert (rows["saeray-gba-htf0.3"]["htf"], rows["saeray-gba-htf0.3"]["ltf"]) == (0.3, 1e-4)
    assert "htf" not in rows["saeray-topk"] and "htf" not in rows["saeray-gated"]
    assert rows["saelens-topk"]["k"] == rows["saeray-topk"]["k"] == t["k"]
    assert {x["saelens_arch"] for x in rows.values()} == {"topk", "standard", "gated"}
    for name, x in rows.items():
        assert 0 < x["mcc"] <= 1 and 0 < x["uniqueness"] <= 1 and 0 <= x["dead_latents"] <= 32
        assert x["tokens_per_s"] > 0 and x["true_l0"] == pytest.approx(d["true_l0"], rel=0.1)
        assert (Path(x["path"]) / "cfg.json").exists() and Path(x["path"]).parent == out / "saes"
        assert x["train_s"] > 0 and x["tokens_per_s"] == pytest.approx(t["tokens"] / x["train_s"], rel=1e-6)
        if name.startswith("saeray"):   # SAELens computes with saeray's file what saeray computes with the module
            assert x["roundtrip"]["recon_max_abs_diff"] < 1e-4 and x["roundtrip"]["active_mismatch_frac"] < 1e-3
            assert x["fit_tokens_per_s"] >= x["tokens_per_s"]      # fit's own figure leaves out its init
        else:   # saeray's reader takes SAELens's own TopK file (decoder-norm rescaling folded in)
            assert x["saeray_load"] == "ok"
    assert rows["saeray-topk"]["sae_l0"] == pytest.approx(t["k"], abs=0.01)
    assert rows["saelens-topk"]["sae_l0"] == pytest.approx(t["k"], abs=0.01)
    # all were scored on the same held-out rows: the ground truth's L0 is identical across SAEs
    assert len({x["true_l0"] for x in rows.values()}) == 1


# ---- saeray bench saelens-family ------------------------------------------------------------------

def test_family_command_checks_input_before_installing(tmp_path):
    venv = tmp_path / "venv"
    for argv, needle in ((["--settings", "d32-easy,nope"], "unknown setting 'nope'"), (["--lr", "0"], "--lr")):
        r = subprocess.run([sys.executable, "-m", "saeray", "bench", "saelens-family", "--venv", str(venv), *argv],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not venv.exists()
    assert se.side_cmd("/v/bin/python", ["--json"], se.FAMILY_MODULE) == \
        ["/v/bin/python", "-m", "saeray.bench.saelens_family", "--json"]


def test_family_side_streams_the_family_batches_in_order():
    import numpy as np

    from saeray.bench.recovery_family import FAMILY, pick_settings
    from saeray.bench.saelens_family import _Stream

    assert [s.name for s in pick_settings("")] == [s.name for s in FAMILY]
    assert [s.name for s in pick_settings(" d256, d32-easy ")] == ["d32-easy", "d256"]   # the family's order
    with pytest.raises(InputError, match="unknown setting 'x'"):
        pick_settings("d256,x")
    pf = FAMILY[0].planted()
    st = _Stream(pf.batches(64, 192)())
    got = [st(64) for _ in range(3)]
    want = list(pf.batches(64, 192)())
    assert st.rows == 192 and all(torch.equal(g, torch.as_tensor(w)) for g, w in zip(got, want))
    assert got[0].dtype == torch.float32 and not np.allclose(want[0], want[1])
    with pytest.raises(StopIteration):      # never more rows than the budget
        st(64)
    with pytest.raises(RuntimeError, match="batches hold 64"):
        _Stream(pf.batches(64, 128)())(32)


@pytest.mark.slow
def test_bench_saelens_family_end_to_end(tmp_path):
    """SAELens's and saeray's TopK and BatchTopK on one family setting, scored alike."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "saeray", "--log-level", "WARNING", "bench", "saelens-family",
                        "--settings", "d32-easy", "--tokens", "102400", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == json.loads((out / "result.json").read_text())
    assert any(ln.startswith("d32-easy") and "saelens-batchtopk" in ln for ln in lines[:-1])   # the table first
    assert res["tokens"] == 102400 and res["settings"] == ["d32-easy"] and res["saelens_lr"] == 3e-4
    rows = {x["name"]: x for x in res["rows"]}
    assert list(rows) == ["saeray-topk", "saeray-batchtopk", "saelens-topk", "saelens-batchtopk"]
    # the family's k rules on both sides: ceil(1.5 x 1.41) = 3 for TopK, the true L0 for BatchTopK
    assert rows["saeray-topk"]["k"] == rows["saelens-topk"]["k"] == 3
    assert rows["saeray-batchtopk"]["k"] == rows["saelens-batchtopk"]["k"] == pytest.approx(1.41, abs=0.01)
    assert rows["saelens-topk"]["l0"] == pytest.approx(3.0) and rows["saeray-topk"]["l0"] <= 3.0
    for x in rows.values():
        assert 0 <= x["frr90"] <= x["frr80"] <= 1 and 0 < x["mean_best_cos"] <= 1 and 0 < x["mcc"] <= 1
    # 100 steps are enough for every SAE to find some features at cosine 0.8 (an untrained one finds none)
    assert all(x["frr80"] > 0 for x in rows.values()), rows

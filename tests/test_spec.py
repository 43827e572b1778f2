"""`saeray validate`: every broken spec gets one clear message naming the field (and line), exit 2,
no traceback; the good spec round-trips; ${ENV} placeholders never leak into outputs."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saeray.errors import InputError
from saeray.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
GOOD = textwrap.dedent("""\
    name: t1
    model:
      name: storyworld-2l
    hookpoints: ["resid_post.0", "mlp_post.*"]
    sae:
      architectures:
        - {arch: topk, width: 64, k: 4}
        - {arch: relu, width: 64, l1: 1.0}
    store: ./runs
    """)


def run_validate(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return subprocess.run([sys.executable, "-m", "saeray", *extra, "validate", str(p)],
                          capture_output=True, text=True, cwd=tmp_path)


def test_good_spec_normalised(tmp_path):
    r = run_validate(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    assert "trust_remote_code: false" in r.stdout  # defaults filled in
    assert "unit_contexts: 256" in r.stdout
    again = parse_spec(r.stdout)  # the printed form is itself a valid spec
    assert again == parse_spec(GOOD)


def test_default_job_spec_valid():
    s = load_spec(str(REPO / "jobs" / "storyworld.yaml"))
    assert s.models[0].name == "storyworld-4l" and s.models[0].revisions == ["main"]
    assert {v.arch for v in s.sae.architectures} >= {"relu", "topk", "gated", "gba"}


BROKEN = {
    "bad_yaml": (GOOD.replace("name: t1", "name: [t1"), ["not valid YAML", "spec.yaml:"]),
    "unknown_key": (GOOD.replace("  name: storyworld-2l", "  name: storyworld-2l\n  revison: step1"),
                    ["model.revison", "unknown key", "spec.yaml:4"]),
    "wrong_type": (GOOD.replace("width: 64, k: 4", "width: wide, k: 4"),
                   ["sae.architectures[0].width", "integer", "spec.yaml:7"]),
    "negative_size": (GOOD.replace("width: 64, l1: 1.0", "width: -3, l1: 1.0"),
                      ["sae.architectures[1].width", "greater than or equal to 1"]),
    "k_zero": (GOOD.replace("k: 4", "k: 0"), ["sae.architectures[0].k", "must be greater than 0"]),
    "missing_model": (GOOD.replace("model:\n  name: storyworld-2l\n", ""), ["model: required field is missing"]),
    "empty_model_name": (GOOD.replace("name: storyworld-2l", "name: ''"), ["model.name", "must name a model"]),
    "bad_hookpoint": (GOOD.replace('"mlp_post.*"', '"blocks.3.hook_resid_post"'),
                      ["hookpoints[1]", "is not a hook point name", "resid_post.3"]),
    "unknown_hook_kind": (GOOD.replace('"mlp_post.*"', '"mlp_pre.2"'), ["unknown hook point kind 'mlp_pre'"]),
    "bad_store_scheme": (GOOD.replace("store: ./runs", "store: ftp://host/x"), ["store.url", "unsupported store URL scheme 'ftp://'"]),
    "bad_bucket": (GOOD.replace("store: ./runs", "store: s3://B_/x"), ["store.url", "not a valid S3 bucket name"]),
    "bad_resources": (GOOD + "resources:\n  harvest: {num_gpus: -1}\n", ["resources.harvest.num_gpus", "greater than or equal to 0"]),
    "resources_unknown": (GOOD + "resources:\n  train: {gpus: 1}\n", ["resources.train.gpus", "unknown key"]),
    "topk_without_k": (GOOD.replace("width: 64, k: 4", "width: 64"), ["sae.architectures[0]", "needs k"]),
    "relu_without_l1": (GOOD.replace("width: 64, l1: 1.0", "width: 64"), ["sae.architectures[1]", "needs l1"]),
    "topk_with_l1": (GOOD.replace("width: 64, k: 4", "width: 64, k: 4, l1: 2.0"), ["sae.architectures[0]", "takes no l1"]),
    "unknown_arch": (GOOD.replace("arch: relu", "arch: relu6"), ["sae.architectures[1].arch", "'relu'", "'gba'"]),
    "not_a_mapping": ("- just\n- a list\n", ["must be a YAML mapping"]),
    "htf_on_topk": (GOOD.replace("width: 64, k: 4", "width: 64, k: 4, htf: 0.01"),
                    ["sae.architectures[0]", "'topk' takes no htf", "GBA's target-frequency range"]),
    "gba_range_upside_down": (GOOD.replace("{arch: relu, width: 64, l1: 1.0}", "{arch: gba, width: 64, ltf: 0.2}"),
                              ["sae.architectures[1]", "0 < ltf < htf <= 1", "htf=0.1, ltf=0.2"]),
    "gba_htf_zero": (GOOD.replace("{arch: relu, width: 64, l1: 1.0}", "{arch: gba, width: 64, htf: 0}"),
                     ["sae.architectures[1].htf", "must be greater than 0"]),
    "k_aux_on_relu": (GOOD.replace("width: 64, l1: 1.0", "width: 64, l1: 1.0, k_aux: 2"),
                      ["sae.architectures[1]", "'relu' takes no k_aux", "AuxK loss of batchtopk and topk"]),
    "k_aux_zero": (GOOD.replace("width: 64, k: 4", "width: 64, k: 4, k_aux: 0"),
                   ["sae.architectures[0].k_aux", "greater than or equal to 1"]),
    "k_aux_fraction": (GOOD.replace("width: 64, k: 4", "width: 64, k: 4, k_aux: 2.5"),
                       ["sae.architectures[0].k_aux", "integer"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_specs(tmp_path, case):
    text, needles = BROKEN[case]
    r = run_validate(tmp_path, text)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, f"{case}: {n!r} not in {r.stderr!r}"


def test_all_errors_reported_at_once(tmp_path):
    text = GOOD.replace("k: 4", "k: 0").replace("store: ./runs", "store: ftp://x") + "bogus: 1\n"
    r = run_validate(tmp_path, text)
    assert r.returncode == 2
    assert "3 error(s)" in r.stderr
    for n in ("sae.architectures[0].k", "store.url", "bogus"):
        assert n in r.stderr


def test_missing_file_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "saeray", "validate", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "spec file not found" in r.stderr and "Traceback" not in r.stderr


def test_env_interpolation_kept_out_of_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAERAY_TEST_SECRET", "hunter2-very-secret")
    text = GOOD.replace("store: ./runs", "store:\n  url: ./runs\n  secret: ${SAERAY_TEST_SECRET}\n  region: ${SAERAY_NO_SUCH_VAR:-eu-west-1}")
    spec = parse_spec(text)
    assert spec.store.secret == "${SAERAY_TEST_SECRET}"
    assert "hunter2" not in str(spec.to_dict())
    r = spec.resolved()
    assert r.store.secret == "hunter2-very-secret" and r.store.region == "eu-west-1"
    out = run_validate(tmp_path, text)
    assert out.returncode == 0 and "hunter2" not in out.stdout and "${SAERAY_TEST_SECRET}" in out.stdout


def test_env_missing_is_input_error():
    text = GOOD.replace("store: ./runs", "store:\n  url: ./runs\n  key: ${SAERAY_SURELY_UNSET_VAR}")
    with pytest.raises(InputError, match="SAERAY_SURELY_UNSET_VAR is not set"):
        parse_spec(text).resolved()


def test_store_override_flag(tmp_path):
    r = run_validate(tmp_path, GOOD, "--store", "s3://my-bucket/p")
    assert r.returncode == 0 and "url: s3://my-bucket/p" in r.stdout


def test_models_list_and_revision_keywords():
    """`model` takes one mapping (today's form) or a list; revisions take names, `all`, `latest`."""
    one = parse_spec(GOOD)
    many = parse_spec(GOOD.replace("model:\n  name: storyworld-2l\n",
                                   "model:\n  - {name: storyworld-2l, revisions: all}\n"
                                   "  - {name: storyworld-4l, revisions: [step64, latest]}\n"))
    assert [m.name for m in one.models] == ["storyworld-2l"]
    assert [(m.name, m.revisions) for m in many.models] == [("storyworld-2l", ["all"]),
                                                           ("storyworld-4l", ["step64", "latest"])]
    with pytest.raises(InputError, match=r"model: model 'storyworld-2l' is listed twice"):
        parse_spec(GOOD.replace("model:\n  name: storyworld-2l\n",
                                "model:\n  - {name: storyworld-2l}\n  - {name: storyworld-2l}\n"))
    with pytest.raises(InputError, match=r"model\[1\]\.revisions: revision '../x' is not a checkpoint name"):
        parse_spec(GOOD.replace("model:\n  name: storyworld-2l\n",
                                "model:\n  - {name: storyworld-2l}\n  - {name: storyworld-4l, revisions: [../x]}\n"))


def test_gba_range_in_the_spec_and_old_hashes_kept():
    """A GBA variant may move its target range (docs/training.md); a variant that does not dumps
    exactly the keys it had before htf/ltf existed, so existing runs keep their spec hash and resume."""
    from saeray.spec import SAEVariant
    from saeray.train.unit import variant_name, variants_from_spec

    assert SAEVariant(arch="gba", width=8).model_dump(mode="json") == {"arch": "gba", "width": 8, "k": None, "l1": None}
    s = parse_spec(GOOD.replace("{arch: relu, width: 64, l1: 1.0}",
                                "{arch: gba, width: 64}\n    - {arch: gba, width: 64, htf: 0.01}"))
    vs = variants_from_spec(s.sae)
    assert [variant_name(v) for v in vs] == ["topk-w64-k4", "gba-w64", "gba-w64-htf0.01"]
    assert vs[2]["opts"] == {"htf": 0.01} and "opts" not in vs[1]
    # the same range twice is one folder twice: refused
    with pytest.raises(InputError, match="appear twice"):
        variants_from_spec(parse_spec(GOOD.replace("{arch: relu, width: 64, l1: 1.0}",
                                                   "{arch: gba, width: 64, htf: 0.01}\n    - {arch: gba, width: 64, htf: 0.01}")).sae)


def test_k_aux_in_the_spec_reaches_the_sae():
    """A TopK/BatchTopK variant may size its AuxK loss (docs/training.md: 2k when k is small); the
    option travels as the variant's opts into the SAE the trainer builds, and into its folder name."""
    from saeray.sae.train import Variant
    from saeray.sae.registry import build
    from saeray.train.unit import variant_name, variants_from_spec

    s = parse_spec(GOOD.replace("{arch: relu, width: 64, l1: 1.0}",
                                "{arch: topk, width: 64, k: 4, k_aux: 8}\n    - {arch: batchtopk, width: 64, k: 1.5, k_aux: 3}"))
    vs = variants_from_spec(s.sae)
    assert [variant_name(v) for v in vs] == ["topk-w64-k4", "topk-w64-k4-k_aux8", "batchtopk-w64-k1.5-k_aux3"]
    assert "opts" not in vs[0] and vs[1]["opts"] == {"k_aux": 8}
    assert s.model_dump(mode="json")["sae"]["architectures"][0] == {"arch": "topk", "width": 64, "k": 4, "l1": None}
    saes = [build(v["arch"], 32, v["width"], k=v["k"], **v.get("opts", {})) for v in vs]
    assert [sae.k_aux for sae in saes] == [16, 8, 3]           # unset: d_in / 2
    assert [sae.hparams()["k_aux"] for sae in saes] == [16, 8, 3]
    with pytest.raises(InputError, match="'gba' takes no k_aux"):
        build("gba", 32, 64, k_aux=2)
    with pytest.raises(InputError, match="whole number >= 1"):
        build("topk", 32, 64, k=4, k_aux=1.5)
    assert Variant("topk", 64, k=4, opts={"k_aux": 8}).name == "topk-w64-k4-k_aux8"

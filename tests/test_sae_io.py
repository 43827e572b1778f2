"""Round trip save -> saeray.sae.load for every architecture, and the on-disk layout against
docs/sae-format.md (names, shapes, cfg fields SAELens's loader needs)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeray.errors import InputError
from saeray.sae import ARCHS, build, load, save
from saeray.sae.registry import NEEDS_K, NEEDS_L1

torch.set_num_threads(1)
DOC = Path(__file__).resolve().parents[1] / "docs" / "sae-format.md"
D, W = 12, 40


def documented_layout() -> dict[str, dict[str, tuple[str, ...]]]:
    text = DOC.read_text()
    section = text.split("## Tensors", 1)[1].split("\n## ", 1)[0]
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*(standard|topk|jumprelu|gated)\s*\|\s*(\w+)\s*\|\s*([\w, ]+?)\s*\|$", line)
        if m:
            out.setdefault(m[1], {})[m[2]] = tuple(s.strip() for s in m[3].split(","))
    return out


def trained_like(arch: str) -> torch.nn.Module:
    """A module with non-trivial values everywhere (biases, scales, thresholds, input scale)."""
    torch.manual_seed(1)
    kw = {"k": 5} if arch in NEEDS_K else ({"l1": 0.1} if arch in NEEDS_L1 else {})
    sae = build(arch, D, W, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        sae.input_scale.fill_(0.37)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
        if arch == "gba":
            sae.bias.copy_(-0.3 * torch.rand(W))
        if arch == "jumprelu":
            sae.threshold.copy_(0.05 + 0.3 * torch.rand(W))
    return sae.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_identical_outputs(arch, tmp_path):
    sae = trained_like(arch)
    x = 3.0 * torch.randn(256, D)
    url = save(sae, tmp_path / arch, info={"metrics": {"fvu": 0.5}})
    back = load(url)
    with torch.no_grad():
        f0, f1 = sae.encode(x), back.encode(x)
        r0, r1 = sae(x).recon, back(x).recon
    assert (f0 != 0).float().mean() > 0.02, "test input should activate latents"
    assert torch.equal(f0 != 0, f1 != 0)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    # a second save of the loaded module is bit-identical (nothing drifts through repeated round trips)
    url2 = save(back, tmp_path / (arch + "2"))
    a, b = load_file(f"{url}/sae_weights.safetensors"), load_file(f"{url2}/sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(Path(url, "saeray.json").read_text())["arch"] == arch


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_matches_documentation(arch, tmp_path):
    layout = documented_layout()
    assert set(layout) == {"standard", "topk", "jumprelu", "gated"}
    sae = trained_like(arch)
    url = save(sae, tmp_path / arch, hook_name="blocks.0.hook_resid_post", model_name="m")
    cfg = json.loads(Path(url, "cfg.json").read_text())
    tensors = load_file(f"{url}/sae_weights.safetensors")
    want = layout[cfg["architecture"]]
    dims = {"d_in": D, "d_sae": W}
    assert set(tensors) == set(want)
    for name, shape in want.items():
        assert tuple(tensors[name].shape) == tuple(dims[s] for s in shape), name
        assert tensors[name].dtype == torch.float32
    expected_arch = {"relu": "standard", "gba": "standard", "topk": "topk", "batchtopk": "jumprelu",
                     "gated": "gated", "jumprelu": "jumprelu"}[arch]
    assert cfg["architecture"] == expected_arch
    # fields SAELens's v6 loader needs
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "metadata"):
        assert key in cfg, key
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D, W, "float32", "none")
    assert tuple(int(p) for p in cfg["metadata"]["sae_lens_version"].split(".")) >= (6, 0, 0)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    if arch == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False


def test_saved_weights_follow_saelens_semantics(tmp_path):
    """Recompute the SAELens forward by hand from the files (no saeray code) for each architecture."""
    x = 2.0 * torch.randn(64, D)
    for arch in ARCHS:
        sae = trained_like(arch)
        url = save(sae, tmp_path / arch)
        t = load_file(f"{url}/sae_weights.safetensors")
        cfg = json.loads(Path(url, "cfg.json").read_text())
        xc = x - t["b_dec"]
        if cfg["architecture"] == "gated":
            g = (xc @ t["W_enc"] + t["b_gate"]) > 0
            f = g * torch.relu(xc @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
        else:
            z = xc @ t["W_enc"] + t["b_enc"]
            if cfg["architecture"] == "standard":
                f = z.relu()
            elif cfg["architecture"] == "topk":
                v, i = z.topk(cfg["k"], dim=-1)
                f = torch.zeros_like(z).scatter(-1, i, v.relu())
            else:
                f = z.relu() * (z > t["threshold"])
        with torch.no_grad():
            torch.testing.assert_close(f @ t["W_dec"] + t["b_dec"], sae(x).recon, rtol=1e-4, atol=1e-4)


def test_load_from_s3(s3_url):
    sae = trained_like("topk")
    url = save(sae, f"{s3_url}/sae/topk")
    back = load(url)
    x = torch.randn(16, D)
    with torch.no_grad():
        torch.testing.assert_close(back(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="valid: relu, topk"):
        build("sparse", 4, 8)
    with pytest.raises(InputError, match="needs k"):
        build("topk", 4, 8)
    with pytest.raises(InputError, match="no l1"):
        build("gba", 4, 8, l1=0.1)
    with pytest.raises(InputError, match="not an SAE folder"):
        load(tmp_path)


def test_gba_gate_only_saves_as_jumprelu(tmp_path):
    """GBA with act='jumprelu' (bias gates, output unshrunk) round-trips as a SAELens jumprelu SAE."""
    torch.manual_seed(2)
    sae = build("gba", D, W, act="jumprelu")
    with torch.no_grad():
        sae.bias.copy_(-0.5 * torch.rand(W))
        sae.a.add_(0.1 * torch.randn(W))
        sae.input_scale.fill_(0.37)
    sae.eval()
    x = 3.0 * torch.randn(256, D)
    with torch.no_grad():
        f = sae.encode(x)
    u = (x * 0.37 - sae.b_pre) @ sae.W.t()
    # gate-only: every active latent carries its full projection, not projection + bias
    assert (f != 0).float().mean() > 0.02
    torch.testing.assert_close(f[f != 0], u[f != 0])
    url = save(sae, tmp_path / "gba-j")
    assert json.loads(Path(url, "cfg.json").read_text())["architecture"] == "jumprelu"
    back = load(url)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)


def test_loads_saelens_topk_with_decoder_norm_rescaling(tmp_path):
    """SAELens's TopK default (rescale_acts_by_decoder_norm: true) loads with the latents and
    reconstruction of SAELens's own formula: select on pre·‖W_dec[i]‖, decode acts/‖W_dec[i]‖."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    t = {"W_enc": torch.randn(D, W, generator=g), "b_enc": torch.randn(W, generator=g),
         "W_dec": torch.randn(W, D, generator=g) * (0.2 + 3 * torch.rand(W, 1, generator=g)),
         "b_dec": torch.randn(D, generator=g)}
    folder = tmp_path / "saelens-topk"
    folder.mkdir()
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": W, "k": 5,
                                                 "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True,
                                                 "normalize_activations": "none", "dtype": "float32"}))
    x = torch.randn(64, D, generator=g)
    n = t["W_dec"].norm(dim=1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
    v, i = pre.topk(5, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
    recon = (acts / n) @ t["W_dec"] + t["b_dec"]
    sae = load(folder)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).recon, recon, rtol=1e-5, atol=1e-4)

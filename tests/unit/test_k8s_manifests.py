"""Checks of the Kubernetes manifests in k8s/, without a cluster and without a running Ray.

Every YAML document under k8s/ is validated: RayCluster, RayJob and RayService (ray.io/v1) against the
openAPIV3Schema of the official KubeRay v1.7.0 CRDs, kept in tests/unit/schemas/kuberay/, made strict (the API
server prunes unknown fields silently, so a typo like ``rayStartParam`` would otherwise be dropped without a word);
ConfigMap, PersistentVolumeClaim, Secret, Service, PodMonitor and ServiceMonitor against the small hand-written
schemas in tests/unit/schemas/; NetworkPolicy and PodDisruptionBudget against the upstream Kubernetes schemas
(kubernetes-validate). On top of the schemas: the rules the KubeRay operator enforces when it reconciles, and the
project's own contracts (Ray version pin, resources, token auth, the run config, the Serve app, metrics), and the
hardening: the Pod Security "restricted" profile for every container, memory-backed /dev/shm, NetworkPolicies
(evaluated on the labels KubeRay gives the pods) and the serve workers' PodDisruptionBudget.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import tomllib
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMA_DIR = SCHEMA_DIR / "kuberay"  # KubeRay v1.7.0; refresh.py there fetches another release
CRD_FILES = {"RayCluster": "rayclusters.v1.json", "RayJob": "rayjobs.v1.json", "RayService": "rayservices.v1.json"}
RAY_API_VERSION = "ray.io/v1"
# Built-in kinds validated against the upstream schemas of kubernetes-validate (not in k8s_core_objects.json).
UPSTREAM_KINDS = ("networking.k8s.io/v1/NetworkPolicy", "policy/v1/PodDisruptionBudget")
SHARED_MOUNT = "/mnt/shared"
SERVE_IMPORT_PATH = "serving.app:build_app"
# Metric names agreed with the training and serving code (Ray prefixes application metrics with ray_).
DASHBOARD_METRICS = (
    "ray_rayfine_train_samples_per_second", "ray_rayfine_train_loss", "ray_rayfine_train_step",
    "ray_rayfine_serve_request_latency_ms_bucket", "ray_rayfine_serve_requests_total",
    "ray_rayfine_serve_errors_total", "ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; kubectl rejects the file. So do we."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dupes:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@lru_cache(maxsize=None)
def load_documents(path: Path) -> tuple[dict, ...]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if d is not None]
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict), f"{path.name} document {i}: not a mapping"
    return tuple(docs)


def all_documents() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(K8S_DIR)}#{i}", d) for p in manifest_files() for i, d in enumerate(load_documents(p))]


def docs_of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, d) for where, d in all_documents() if d.get("kind") == kind]


def the_one(kind: str) -> dict:
    found = docs_of_kind(kind)
    assert len(found) == 1, f"expected exactly one {kind} under k8s/, found {[w for w, _ in found]}"
    return found[0][1]


def ray_pin() -> str:
    text = (REPO_ROOT / "requirements.txt").read_text()
    match = re.search(r"^ray(\[[^\]]*\])?==([0-9][^\s;#]*)", text, re.MULTILINE)
    assert match, "requirements.txt: no exact pin ray[...]==X"
    return match.group(2)


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    """The openAPIV3Schema of KubeRay's ``ray.io/v1`` CRD for ``kind``, as the API server has it."""
    return json.loads((CRD_SCHEMA_DIR / CRD_FILES[kind]).read_text())


# ---------------------------------------------------------------------------------------------------------------
# Strict validation against CRD schemas
# ---------------------------------------------------------------------------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")   # name -> schema
_SCHEMAS = ("items", "additionalProperties", "not")                 # a schema (or, for items, a list of them)
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema from a CRD, rewritten as a JSON schema that rejects unknown fields.

    - ``x-kubernetes-int-or-string: true`` accepts an integer or a string;
    - ``nullable: true`` also accepts null;
    - an object with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields: true`` rejects keys it does not declare (the API server would prune
      them silently).
    Everything else (defaults, enums, CEL rules) is kept as it is.
    """
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMAS or key in _SCHEMA_LISTS:
            out[key] = [strict_schema(v) for v in value] if isinstance(value, list) else strict_schema(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") is True and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and out.get("x-kubernetes-preserve-unknown-fields") is not True:
        out["additionalProperties"] = False
    return out


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `set` items are unique, `map` items are unique by their list-map-keys."""
    if not isinstance(instance, list):
        return
    if value == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list-type=set list: {instance}")
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        tuples = [tuple(i.get(k, item_props.get(k, {}).get("default")) for k in keys)
                  for i in instance if isinstance(i, dict)]
        dupes = {t for t in tuples if tuples.count(t) > 1}
        if dupes:
            yield jsonschema.ValidationError(f"duplicate {keys} in a list-type=map list: {sorted(map(str, dupes))}")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Validator:
    return KubernetesValidator(strict_schema(crd_schema(kind)))


@lru_cache(maxsize=None)
def core_schemas() -> dict:
    return json.loads((SCHEMA_DIR / "k8s_core_objects.json").read_text())


def schema_errors(doc: dict) -> list[str]:
    """Every schema problem of one document, as 'path: message'."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    bundle = core_schemas()
    errors = []
    if kind in CRD_FILES:
        if api != RAY_API_VERSION:
            return [f"apiVersion: {api!r}; KubeRay 1.7 serves {kind} as {RAY_API_VERSION} (v1alpha1 is deprecated)"]
        errors += crd_validator(kind).iter_errors(doc)
        # A CRD schema leaves metadata open: check it as for core objects.
        metadata = jsonschema.Draft202012Validator({"$defs": bundle["$defs"], "$ref": "#/$defs/metadata"})
        for error in metadata.iter_errors(doc.get("metadata")):
            error.path.appendleft("metadata")
            errors.append(error)
    elif f"{api}/{kind}" in UPSTREAM_KINDS:
        kubernetes_validate = pytest.importorskip("kubernetes_validate")
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path)) or "(top)"
            return [f"{path}: {exc.message}"]
        return []
    else:
        schema = bundle["kinds"].get(f"{api}/{kind}")
        if schema is None:
            return [f"no schema for {api}/{kind}; known: {', '.join(CRD_FILES)} and {', '.join(bundle['kinds'])}"]
        errors += jsonschema.Draft202012Validator({"$defs": bundle["$defs"], **schema}).iter_errors(doc)
    errors.sort(key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------------------------
# Walking manifests
# ---------------------------------------------------------------------------------------------------------------

def ray_cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(doc.get("kind"), "")
    if key is None:
        return [("spec", spec)]
    return [(f"spec.{key}", spec[key])] if key and key in spec else []


def all_ray_cluster_specs() -> list[tuple[str, dict, dict]]:
    return [(f"{where} {path}", cluster, doc) for where, doc in all_documents()
            for path, cluster in ray_cluster_specs(doc)]


def groups(cluster: dict) -> Iterator[tuple[str, dict]]:
    yield "headGroupSpec", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group.get('groupName')}]", group


def pod_specs(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every pod spec (a mapping with a `containers` list) inside a document."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{path}[{i}]")


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside a document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


_QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": 1e-9,
                      "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(value: Any) -> float:
    match = re.fullmatch(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in _QUANTITY_SUFFIXES, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2)]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def run_config_raw() -> dict:
    return load_yaml(the_one("ConfigMap")["data"]["run.yaml"])


def serve_config() -> dict:
    return load_yaml(the_one("RayService")["spec"]["serveConfigV2"])


# ---------------------------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------------------------

def test_the_expected_files_exist():
    expected = ["rayjob-finetune.yaml", "configmap-run.yaml", "pvc-shared.yaml", "rayservice.yaml",
                "raycluster.yaml", "networkpolicies.yaml", "pdb-serve.yaml", "monitoring/podmonitor.yaml",
                "monitoring/grafana-dashboard.json", "Dockerfile", "README.md"]
    missing = [name for name in expected if not (K8S_DIR / name).is_file()]
    assert not missing, f"missing under k8s/: {missing}"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_every_document_matches_its_schema(path):
    problems = []
    for i, doc in enumerate(load_documents(path)):
        name = (doc.get("metadata") or {}).get("name")
        problems += [f"{path.name}#{i} {doc.get('kind')}/{name}: {e}" for e in schema_errors(doc)]
        if "status" in doc:
            problems.append(f"{path.name}#{i}: `status` is written by the operator, not by manifests")
    assert not problems, "\n".join(problems)


def test_core_objects_match_the_kubernetes_schemas():
    """The full upstream schemas, when kubernetes-validate is installed (strict: unknown keys fail)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [(where, d) for where, d in all_documents()
            if d.get("apiVersion") == "v1" or f"{d.get('apiVersion')}/{d.get('kind')}" in UPSTREAM_KINDS]
    assert core, "no core objects found under k8s/"
    # The pod templates inside the Ray resources too, checked as Pods.
    core += [(f"{where} {path}", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"}, "spec": pod})
             for where, doc in all_documents() if doc.get("kind") in CRD_FILES for path, pod in pod_specs(doc)]
    for where, doc in core:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message}")


def _rayjob() -> dict:
    return copy.deepcopy(the_one("RayJob"))


def test_a_misspelled_field_fails_crd_validation():
    doc = _rayjob()
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    errors = schema_errors(doc)
    assert any("rayStartParam'" in e and "headGroupSpec" in e for e in errors), errors
    # The CRD schema as the API server uses it accepts the typo (and prunes the field): hence strict_schema.
    assert KubernetesValidator(crd_schema("RayJob")).is_valid(doc)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
        resource={}), "resource'"),
    (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="Token"), "'Token' is not one of"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"), "'2' is not of type"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"].update(cpu="four"), "cpu"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HF_HOME", "value": "/tmp"}), "duplicate"),
    (lambda d: d["metadata"].update(label={"a": "b"}), "label'"),
], ids=["spec-typo", "container-typo", "enum", "type", "required", "quantity", "list-map-duplicate", "metadata-typo"])
def test_crd_validation_catches(mutate, expected):
    doc = _rayjob()
    mutate(doc)
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), f"expected an error mentioning {expected!r}, got {errors}"


def test_duplicate_yaml_keys_are_rejected():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        load_yaml("spec:\n  replicas: 1\n  replicas: 2\n")


def test_int_or_string_quantities_accept_both_forms():
    doc = _rayjob()
    limits = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for cpu in (4, "4", "4000m", "2.5"):
        limits["cpu"] = cpu
        assert schema_errors(doc) == [], cpu
    limits["cpu"] = 2.5  # a bare float is neither: the API server rejects it inside a CRD, so must we
    assert any("limits.cpu" in e for e in schema_errors(doc))


def test_strict_schema_honours_preserve_unknown_fields():
    schema = strict_schema({"type": "object", "properties": {
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "port": {"x-kubernetes-int-or-string": True},
    }})
    validator = KubernetesValidator(schema)
    assert validator.is_valid({"open": {"a": "x", "b": 1}, "port": 8000})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"closed": {"a": "x", "b": 1}})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"unknown": 1})


@pytest.mark.parametrize("doc, expected", [
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {"a": "b"}}, "dta"),
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"nam": "x"}}, "'name' is a required"),
    ({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
      "spec": {"accessModes": ["ReadWriteMany"], "resources": {"request": {"storage": "1Gi"}}}}, "request'"),
    ({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
      "spec": {"selector": {}, "podMetricEndpoints": [{"port": "metrics"}]}}, "podMetricEndpoints"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
      "spec": {"ports": [{"port": "http"}]}}, "'http' is not of type"),
    ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}, "no schema for apps/v1/Deployment"),
    ({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
      "spec": {"podSelector": {}, "ingress": [{"form": [{"podSelector": {}}]}]}}, "form"),
    ({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
      "spec": {"podSelector": {}, "policyTypes": "Ingress"}}, "'Ingress' is not of type"),
    ({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
      "spec": {"minAvailable": 1, "selector": {"matchLabel": {"a": "b"}}}}, "matchLabel"),
], ids=["configmap-typo", "metadata-typo", "pvc-typo", "podmonitor-typo", "service-type", "unknown-kind",
        "networkpolicy-typo", "networkpolicy-type", "pdb-typo"])
def test_core_schema_catches(doc, expected):
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), f"expected an error mentioning {expected!r}, got {errors}"


# ---------------------------------------------------------------------------------------------------------------
# What the KubeRay operator checks when it reconciles (ray-operator/controllers/ray/utils/validation.go)
# ---------------------------------------------------------------------------------------------------------------

def test_kuberay_operator_rules():
    problems = []
    max_len = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # room for the suffixes KubeRay appends
    for where, doc in all_documents():
        kind, spec, name = doc.get("kind"), doc.get("spec") or {}, doc["metadata"]["name"]
        if kind not in CRD_FILES:
            continue
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > max_len[kind]:
            problems.append(f"{where}: name {name!r} must be a DNS-1035 label of at most {max_len[kind]} chars")
        if kind == "RayJob":
            mode = spec.get("submissionMode", "K8sJobMode")
            if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
                problems.append(f"{where}: submissionMode {mode!r} is unknown")
            if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
            if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
                problems.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
            if spec.get("deletionStrategy") and spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{where}: deletionStrategy (feature-gated) conflicts with shutdownAfterJobFinishes")
            for key in ("activeDeadlineSeconds", "backoffLimit"):
                if key in spec and spec[key] < 0:
                    problems.append(f"{where}: {key} must not be negative")
        if kind == "RayService":
            upgrade = (spec.get("upgradeStrategy") or {}).get("type")
            if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
                problems.append(f"{where}: upgradeStrategy.type {upgrade!r} is not NewCluster, "
                                "NewClusterWithIncrementalUpgrade or None")
            head_service = spec["rayClusterConfig"]["headGroupSpec"].get("headService") or {}
            if (head_service.get("metadata") or {}).get("name"):
                problems.append(f"{where}: headService.metadata.name must not be set in a RayService")
    for where, cluster, _ in all_ray_cluster_specs():
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs", [])]
        if len(names) != len(set(names)):
            problems.append(f"{where}: worker group names repeat: {names}")
        for group_name, group in groups(cluster):
            params = group.get("rayStartParams") or {}
            if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                problems.append(f"{where} {group_name}: resources in both rayStartParams and `resources`")
            if "labels" in params:
                problems.append(f"{where} {group_name}: use the group's `labels`, not rayStartParams.labels")
            if not group["template"]["spec"].get("containers"):
                problems.append(f"{where} {group_name}: no containers")
            if group_name != "headGroupSpec":
                lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
                if not lo <= group.get("replicas", lo) <= hi:
                    problems.append(f"{where} {group_name}: needs minReplicas <= replicas <= maxReplicas")
        head_env = {e["name"] for e in ray_container(cluster["headGroupSpec"]).get("env", [])}
        if "RAY_REDIS_ADDRESS" in head_env and not cluster.get("gcsFaultToleranceOptions"):
            problems.append(f"{where}: RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# Project contracts
# ---------------------------------------------------------------------------------------------------------------

def test_ray_versions_and_images_match_the_pins():
    pin, version = ray_pin(), project_version()
    problems = []
    for where, cluster, _ in all_ray_cluster_specs():
        if str(cluster.get("rayVersion")) != pin:
            problems.append(f"{where}: rayVersion {cluster.get('rayVersion')!r}, requirements.txt pins ray=={pin}")
    for where, doc in all_documents():
        for path, pod in pod_specs(doc):
            for c in containers(pod):
                image = c.get("image", "")
                repo, _, tag = image.rsplit("/", 1)[-1].partition(":")
                ray_base = image.split("/", 1)[-1] if image.startswith("docker.io/") else image
                ok = (repo == "rayfine" and (tag == version or tag.startswith(f"{version}-"))) or (
                    ray_base.startswith("rayproject/ray:") and (tag == pin or tag.startswith(f"{pin}-")))
                if not ok:
                    problems.append(f"{where} {path} {c['name']}: image {image!r}; want rayfine:{version} "
                                    f"(built by k8s/Dockerfile) or rayproject/ray:{pin}-*")
    # Every mention of the Ray base image, comments and docs included.
    for path in sorted(p for p in K8S_DIR.rglob("*") if p.is_file()):
        for tag in re.findall(r"rayproject/ray:([\w.\-]+)", path.read_text()):
            if tag != pin and not tag.startswith(f"{pin}-"):
                problems.append(f"{path.relative_to(REPO_ROOT)}: rayproject/ray:{tag}, requirements.txt pins {pin}")
    assert not problems, "\n".join(problems)


def test_dockerfile_builds_from_the_pinned_ray_image():
    text = (K8S_DIR / "Dockerfile").read_text()
    pin = ray_pin()
    match = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.MULTILINE)
    assert match and match.group(1) == f"rayproject/ray:{pin}-py311-gpu", match and match.group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.MULTILINE)
    assert "pip install --require-hashes --no-deps -r requirements.lock" in text and "pip install --no-deps ." in text
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    needed |= {"pyproject.toml", "requirements.txt", "requirements.lock",
               pyproject["project"].get("readme", "pyproject.toml")}
    copied = {Path(src).name for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              for src in line.split()[:-1] if not src.startswith("--")}
    assert needed <= copied, f"k8s/Dockerfile does not COPY {sorted(needed - copied)}"
    ignore = (K8S_DIR / "Dockerfile.dockerignore").read_text().split()
    unignored = {Path(line[1:].rstrip("/")).name for line in ignore if line.startswith("!")}
    assert needed <= unignored, f"k8s/Dockerfile.dockerignore filters out {sorted(needed - unignored)}"


def test_the_image_lock_pins_and_hashes_what_requirements_txt_pins():
    """k8s/requirements.lock: every pin of requirements.txt at the same version, and every package of the lock
    with at least one sha256 (pip --require-hashes refuses the whole file otherwise)."""
    lock = (K8S_DIR / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", lock,
                         re.MULTILINE)
    locked = {name.lower().replace("_", "-"): version for name, version, _ in entries}
    assert len(locked) > 50 and all(hashes.count("--hash=sha256:") >= 1 for _, _, hashes in entries)
    pins = re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", (REPO_ROOT / "requirements.txt").read_text(),
                      re.MULTILINE)
    assert pins
    for name, version in pins:
        key = name.lower().replace("_", "-")
        assert locked.get(key) == version, f"{name}=={version}: lock has {locked.get(key)}"


def test_every_container_has_requests_and_limits():
    problems = []
    for where, doc in all_documents():
        pods = [(path, c) for path, pod in pod_specs(doc) for c in containers(pod)]
        for path, cluster in ray_cluster_specs(doc):
            if cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions") or {}
                pods.append((f"{path}.autoscalerOptions", {"name": "autoscaler", **options}))
        for path, c in pods:
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for key in ("cpu", "memory", "ephemeral-storage"):
                if key not in requests or key not in limits:
                    problems.append(f"{where} {path} {c['name']}: needs resources.requests and limits for {key}")
                elif quantity(requests[key]) > quantity(limits[key]):
                    problems.append(f"{where} {path} {c['name']}: {key} request above its limit")
            for key in set(requests) | set(limits):
                if "/" in key and quantity(requests.get(key, 0)) != quantity(limits.get(key, 0)):
                    problems.append(f"{where} {path} {c['name']}: extended resource {key} needs request == limit")
    assert not problems, "\n".join(problems)


def test_token_auth_is_on_for_every_ray_cluster():
    problems = []
    for where, cluster, _ in all_ray_cluster_specs():
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{where}: authOptions.mode must be token (the Jobs API runs any code it is given)")
        if version_tuple(str(cluster.get("rayVersion", "0"))) < (2, 52, 0):
            problems.append(f"{where}: token auth needs rayVersion 2.52.0 or later")
        if not auth.get("secretName"):
            problems.append(f"{where}: authOptions.secretName: the token comes from a Secret created beforehand")
        for _, pod in pod_specs(cluster):
            for c in containers(pod):
                for env in c.get("env", []):
                    if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                        problems.append(f"{where} {c['name']}: RAY_AUTH_MODE={env.get('value')!r}")
    assert not problems, "\n".join(problems)


def test_training_and_serving_clusters_use_separate_ray_tokens():
    """Whoever holds the training token (the API server, people submitting runs) must not be able to run code on
    the serving cluster, and the other way round."""
    tokens: dict[str, dict[str, str]] = {"training": {}, "serving": {}}
    for where, cluster, doc in all_ray_cluster_specs():
        side = "serving" if doc["kind"] == "RayService" else "training"
        tokens[side][where] = (cluster.get("authOptions") or {}).get("secretName")
    assert tokens["training"] and tokens["serving"], f"training and serving clusters expected: {tokens}"
    shared = set(tokens["training"].values()) & set(tokens["serving"].values())
    assert not shared, f"training {tokens['training']} and serving {tokens['serving']} share the token Secret {shared}"
    assert len(set(tokens["training"].values())) == 1, f"the training clusters use one token: {tokens['training']}"


def test_ray_pods_mount_the_shared_volume_and_export_metrics():
    claims = {d["metadata"]["name"]: d for _, d in docs_of_kind("PersistentVolumeClaim")}
    problems = []
    for where, cluster, _ in all_ray_cluster_specs():
        for group_name, group in groups(cluster):
            pod, c = group["template"]["spec"], ray_container(group)
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == SHARED_MOUNT), None)
            claim = ((volumes.get(mount["name"]) or {}).get("persistentVolumeClaim") or {}).get("claimName") \
                if mount else None
            if claim not in claims:
                problems.append(f"{where} {group_name}: {SHARED_MOUNT} must mount a PVC defined in k8s/ "
                                f"(got {claim!r}, defined: {sorted(claims)})")
            elif "ReadWriteMany" not in claims[claim]["spec"]["accessModes"]:
                problems.append(f"{where} {group_name}: PVC {claim} must be ReadWriteMany (many pods mount it)")
            ports = {(p.get("name"), p["containerPort"]) for p in c.get("ports", [])}
            if ("metrics", 8080) not in ports:
                problems.append(f"{where} {group_name}: declare containerPort 8080 named metrics (scraped by the "
                                "PodMonitor; a ports list without it also drops it from the head Service)")
    assert not problems, "\n".join(problems)


def test_podmonitors_select_the_ray_pods_on_declared_ports():
    monitors = docs_of_kind("PodMonitor")
    selected = {}
    for where, monitor in monitors:
        labels = monitor["spec"]["selector"].get("matchLabels", {})
        node_type = labels.get("ray.io/node-type")
        assert node_type in ("head", "worker"), f"{where}: select ray.io/node-type head or worker"
        selected[node_type] = (where, labels, [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]])
    assert set(selected) == {"head", "worker"}, f"PodMonitors for head and worker pods expected: {sorted(selected)}"
    problems = []
    for where, cluster, _ in all_ray_cluster_specs():
        for group_name, group in groups(cluster):
            node_type = "head" if group_name == "headGroupSpec" else "worker"
            monitor, labels, ports = selected[node_type]
            pod_labels = {**group["template"].get("metadata", {}).get("labels", {}), "ray.io/node-type": node_type}
            if any(pod_labels.get(k) != v for k, v in labels.items()):
                problems.append(f"{where} {group_name}: pod labels {pod_labels} do not match {monitor}")
            declared = {p.get("name") for p in ray_container(group).get("ports", [])}
            if set(ports) - declared:
                problems.append(f"{where} {group_name}: {monitor} scrapes undeclared ports {set(ports) - declared}")
    assert not problems, "\n".join(problems)


def test_rayjob_trains_the_configmap_config_on_gpus():
    job = the_one("RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "rayfine train /config/run.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["backoffLimit"] >= 0 and spec["submissionMode"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mount = next(m for m in ray_container(cluster["headGroupSpec"])["volumeMounts"] if m["mountPath"] == "/config")
    configmap = volumes[mount["name"]]["configMap"]["name"]
    assert configmap == the_one("ConfigMap")["metadata"]["name"], "the head must mount the run config ConfigMap"
    assert "run.yaml" in the_one("ConfigMap")["data"]
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        res = ray_container(group)["resources"]
        per_pod = int(quantity(res["limits"].get("nvidia.com/gpu", 0)))
        gpus += per_pod * group["maxReplicas"]
    run = run_config_raw()
    assert gpus >= run["scaling"]["num_workers"], f"{gpus} GPUs for {run['scaling']['num_workers']} GPU workers"


def test_run_config_in_the_configmap_is_valid():
    from core.config import load_config  # pydantic only: no Ray, no torch

    cfg = load_config(raw=run_config_raw())
    assert cfg.scaling.use_gpu is True, "the RayJob runs GPU workers: scaling.use_gpu: true"
    assert cfg.output.dir.startswith(f"{SHARED_MOUNT}/"), "checkpoints and the model must land on the shared volume"
    data = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    assert all("://" in d or d.startswith(SHARED_MOUNT) for d in data), "data must be reachable from every pod"


# rayfine-haproxy (cluster.haproxy_launch) where the image's pip installs it; the Dockerfile checks the path.
HAPROXY_LAUNCHER = "/home/ray/anaconda3/bin/rayfine-haproxy"


def test_rayservice_serves_the_trained_model():
    from core.config import ServeConfig, load_config

    service = the_one("RayService")
    config = serve_config()
    apps = config.get("applications") or []
    assert apps, "serveConfigV2 has no applications"
    run = load_config(raw=run_config_raw())
    assert config["http_options"]["host"] == "0.0.0.0", "the proxy must listen on the pod IP"
    for app in apps:
        assert app["import_path"] == SERVE_IMPORT_PATH
        assert {"model_dir", "serve"} <= set(app["args"]) <= {"model_dir", "serve", "trust_remote_code"}
        assert app["args"].get("trust_remote_code", False) is False, "never run a model folder's own code"
        serve = ServeConfig.model_validate(app["args"]["serve"])
        assert app["args"]["model_dir"] == str(run.run_dir / "model"), "serve the model the RayJob exports"
        assert serve.autoscaling is not None, "args.serve.autoscaling: the RayService autoscales"
        assert app["deployments"], "deployments: give Serve the autoscaling and queue limits"
        for dep in app["deployments"]:
            assert dep["autoscaling_config"] == serve.autoscaling.model_dump(), "same numbers as args.serve"
            assert dep["max_ongoing_requests"] == serve.max_ongoing_requests
            assert dep["max_queued_requests"] == serve.max_queued_requests
            assert dep["autoscaling_config"]["target_ongoing_requests"] <= dep["max_ongoing_requests"]
        cluster = service["spec"]["rayClusterConfig"]
        for group_name, group in groups(cluster):
            c = ray_container(group)
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("serve") == config["http_options"]["port"], f"{group_name}: serve port"
            env = {e["name"]: e for e in c.get("env", [])}
            key_env = env.get(serve.api_keys_env, {})
            assert "secretKeyRef" in key_env.get("valueFrom", {}), \
                f"{group_name}: {serve.api_keys_env} must come from a Secret (serve.api_keys_env)"
            assert not key_env["valueFrom"]["secretKeyRef"].get("optional"), "serve without keys: fail closed"
            assert any(app["args"]["model_dir"].startswith(m["mountPath"]) for m in c.get("volumeMounts", []))
            if env.get("RAY_SERVE_ENABLE_HA_PROXY", {}).get("value") == "1":  # HAProxy through the launcher
                assert env["RAY_SERVE_HAPROXY_BINARY_PATH"]["value"] == HAPROXY_LAUNCHER, group_name
    assert service["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling") is True
    assert f'test "$(command -v rayfine-haproxy)" = {HAPROXY_LAUNCHER}' in (K8S_DIR / "Dockerfile").read_text()
    assert service["spec"].get("upgradeStrategy", {}).get("type")


def test_serve_config_keys_are_known_to_ray_serve():
    """Ray Serve's schemas ignore unknown keys, so a typo would be dropped silently: check keys by name."""
    schema = pytest.importorskip("ray.serve.schema")
    from ray.serve.config import AutoscalingConfig

    config = serve_config()
    schema.ServeDeploySchema.model_validate(config)
    problems = []

    def check(where: str, data: dict, model) -> None:
        unknown = set(data) - set(model.model_fields)
        if unknown:
            problems.append(f"{where}: unknown {sorted(unknown)}; known: {sorted(model.model_fields)}")

    check("serveConfigV2", config, schema.ServeDeploySchema)
    check("http_options", config.get("http_options", {}), schema.HTTPOptionsSchema)
    for app in config["applications"]:
        check(f"applications[{app['name']}]", app, schema.ServeApplicationSchema)
        for dep in app.get("deployments", []):
            check(f"deployments[{dep['name']}]", dep, schema.DeploymentSchema)
            check(f"deployments[{dep['name']}].autoscaling_config", dep["autoscaling_config"], AutoscalingConfig)
            AutoscalingConfig.model_validate(dep["autoscaling_config"])
    assert not problems, "\n".join(problems)


def test_serve_config_is_what_rayfine_serve_writes():
    """serveConfigV2 equals serving.deploy.build_serve_config for the same model folder and serve section, so
    the deployment name, options and args stay in step with the app (a deployments entry naming a deployment
    the app does not define fails the deploy)."""
    deploy = pytest.importorskip("serving.deploy")  # imports Ray Serve (no cluster)
    from core.config import ServeConfig

    config = serve_config()
    for app in config["applications"]:
        serve = ServeConfig.model_validate(app["args"]["serve"])
        expected = deploy.build_serve_config(Path(app["args"]["model_dir"]), serve, name=app["name"],
                                             trust_remote_code=app["args"].get("trust_remote_code", False))
        ours = copy.deepcopy(config)
        ours["applications"] = [copy.deepcopy(app)]
        ours["applications"][0]["args"]["serve"] = serve.model_dump(mode="json")  # defaults filled in
        assert json.loads(json.dumps(ours)) == json.loads(json.dumps(expected)), (
            "serveConfigV2 differs from `rayfine serve --config-out`:\n" + yaml.safe_dump(expected, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# Hardening: Pod Security "restricted", /dev/shm, NetworkPolicies, PodDisruptionBudget
# ---------------------------------------------------------------------------------------------------------------

# Security contexts ----------------------------------------------------------------------------------------------

# Fields a container inherits from the pod's securityContext when it does not set them itself.
_INHERITED = ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile", "seLinuxOptions", "windowsOptions",
              "appArmorProfile")
# Volume types the "restricted" profile allows.
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                       "projected", "secret"}


def image_user() -> tuple[int, int]:
    """uid and gid of the last ``USER`` of k8s/Dockerfile (numeric, so the kubelet can check runAsNonRoot)."""
    users = re.findall(r"^USER\s+(\S+)", (K8S_DIR / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "k8s/Dockerfile: no USER line; the pods' runAsUser must be the image's user"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"k8s/Dockerfile: USER {users[-1]}; write it as UID:GID (numbers)"
    return int(match.group(1)), int(match.group(2))


def effective_security_context(pod: dict, container: dict) -> dict:
    pod_context = pod.get("securityContext") or {}
    merged = {k: pod_context[k] for k in _INHERITED if k in pod_context}
    merged.update(container.get("securityContext") or {})
    return merged


def pod_containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(path, pod spec, container) for every container of every pod in a document, the ones KubeRay adds to a
    pod included: the autoscaler sidecar of a head (its securityContext is autoscalerOptions.securityContext).
    KubeRay's own init containers (wait-gcs-ready) copy the Ray container's securityContext."""
    for path, pod in pod_specs(doc):
        for c in containers(pod):
            yield path, pod, c
    for path, cluster in ray_cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions") or {}
            autoscaler = {"name": "autoscaler", "securityContext": options.get("securityContext")}
            yield f"{path}.autoscalerOptions", cluster["headGroupSpec"]["template"]["spec"], autoscaler


def restricted_problems(doc: dict) -> list[str]:
    """What the Pod Security "restricted" profile would reject in a document's pods, and pods that do not run as
    the image's user."""
    uid, gid = image_user()
    problems = []
    for path, pod in pod_specs(doc):
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                problems.append(f"{path}: {key}")
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= _RESTRICTED_VOLUMES:
                problems.append(f"{path} volume {volume['name']}: {sorted(kinds)} is not allowed by 'restricted'")
        if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])) \
                and (pod.get("securityContext") or {}).get("fsGroup") != gid:
            problems.append(f"{path}: mounts a PVC: set securityContext.fsGroup: {gid} (the image's group) so the "
                            "volume is writable")
    for path, pod, c in pod_containers(doc):
        where = f"{path} {c['name']}"
        sc = effective_security_context(pod, c)
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot: true")
        if not sc.get("runAsUser"):
            problems.append(f"{where}: runAsUser: a non-zero uid (the image's user is {uid})")
        elif sc["runAsUser"] != uid:
            problems.append(f"{where}: runAsUser {sc['runAsUser']}, k8s/Dockerfile runs as {uid}")
        if sc.get("runAsGroup") != gid:
            problems.append(f"{where}: runAsGroup {sc.get('runAsGroup')}, k8s/Dockerfile runs as group {gid}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation: false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities.drop: [ALL]")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities.add {caps['add']}; 'restricted' allows NET_BIND_SERVICE only")
        if (sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile.type RuntimeDefault (in the container or the pod)")
        if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            problems.append(f"{where}: hostPort")
    return problems


def test_every_container_runs_under_the_restricted_profile():
    pods = [(where, path) for where, doc in all_documents() for path, _, _ in pod_containers(doc)]
    assert len(pods) >= 8, f"expected the containers of every Ray group and the submitter, found {pods}"
    problems = [f"{where} {p}" for where, doc in all_documents() for p in restricted_problems(doc)]
    assert not problems, "\n".join(problems)


def _group_pod(doc: dict, group: str = "headGroupSpec") -> dict:
    cluster = doc["spec"]["rayClusterSpec"]
    spec = cluster[group] if group == "headGroupSpec" else cluster["workerGroupSpecs"][0]
    return spec["template"]["spec"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: _group_pod(d)["containers"][0]["securityContext"].update(runAsUser=0), "non-zero uid"),
    (lambda d: [sc.pop("runAsUser") for sc in (_group_pod(d)["securityContext"],
                                                _group_pod(d)["containers"][0]["securityContext"])], "non-zero uid"),
    (lambda d: _group_pod(d, "workers")["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
     "allowPrivilegeEscalation"),
    (lambda d: _group_pod(d)["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop"),
    (lambda d: [sc.pop("seccompProfile") for sc in (_group_pod(d)["securityContext"],
                                                     _group_pod(d)["containers"][0]["securityContext"])], "seccomp"),
    (lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"].update(
        runAsNonRoot=False), "runAsNonRoot"),
    (lambda d: _group_pod(d)["securityContext"].pop("fsGroup"), "fsGroup"),
    (lambda d: _group_pod(d)["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda d: _group_pod(d)["initContainers"].append({"name": "setup"}) if "initContainers" in _group_pod(d)
     else _group_pod(d).update(initContainers=[{"name": "setup"}]), "setup: allowPrivilegeEscalation"),
], ids=["root", "no-uid", "escalation", "caps", "seccomp", "submitter", "fsgroup", "hostpath", "init-container"])
def test_restricted_profile_check_catches(mutate, expected):
    doc = _rayjob()
    assert restricted_problems(doc) == []
    mutate(doc)
    problems = restricted_problems(doc)
    assert any(expected in p for p in problems), f"expected a problem mentioning {expected!r}, got {problems}"


def test_the_pods_run_as_the_image_user():
    """k8s/Dockerfile's USER is the base image's user ray (uid 1000, group users 100) and the pods say the same,
    so files the pods write on the shared volume have one owner."""
    assert image_user() == (1000, 100), f"k8s/Dockerfile USER {image_user()}; the rayproject/ray user is 1000:100"
    uid, gid = image_user()
    for where, doc in all_documents():
        for path, pod, c in pod_containers(doc):
            sc = effective_security_context(pod, c)
            assert (sc.get("runAsUser"), sc.get("runAsGroup")) == (uid, gid), f"{where} {path} {c['name']}: {sc}"


# /dev/shm -------------------------------------------------------------------------------------------------------

RAY_OBJECT_STORE_SHARE = 0.3   # Ray's default object store: 30% of the memory it sees (the container limit) ...
RAY_SHM_CAP = 0.95             # ... capped at 95% of /dev/shm


def test_ray_pods_have_a_memory_backed_dev_shm():
    problems = []
    for where, cluster, _ in all_ray_cluster_specs():
        for group_name, group in groups(cluster):
            pod, c = group["template"]["spec"], ray_container(group)
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
            empty_dir = (volumes.get(mount["name"]) or {}).get("emptyDir") if mount else None
            if empty_dir is None or empty_dir.get("medium") != "Memory":
                problems.append(f"{where} {group_name}: mount an emptyDir with medium: Memory at /dev/shm")
                continue
            if "sizeLimit" not in empty_dir:
                problems.append(f"{where} {group_name}: /dev/shm needs a sizeLimit (it counts against memory)")
                continue
            size, memory = quantity(empty_dir["sizeLimit"]), quantity(c["resources"]["limits"]["memory"])
            if size > memory:
                problems.append(f"{where} {group_name}: /dev/shm {empty_dir['sizeLimit']} above the memory limit")
            if size * RAY_SHM_CAP < memory * RAY_OBJECT_STORE_SHARE:
                problems.append(f"{where} {group_name}: /dev/shm {empty_dir['sizeLimit']} caps Ray's object store "
                                f"below its default, {RAY_OBJECT_STORE_SHARE:.0%} of the memory limit")
    assert not problems, "\n".join(problems)


# NetworkPolicies ------------------------------------------------------------------------------------------------

NAMESPACE = "rayfine"                 # where k8s/README.md applies everything
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
METRICS_PORTS = {8080, 44217, 44227}  # Ray's metrics export port; the autoscaler's and the dashboard's (heads)
MONITORING_NAMESPACE = "monitoring"   # kube-prometheus-stack, as k8s/README.md installs it
# Who may use a head's Jobs API, as documented in k8s/README.md and k8s/networkpolicies.yaml.
API_SERVER_LABELS = {"app.kubernetes.io/name": "rayfine", "app.kubernetes.io/component": "rayfine-api"}
OPERATOR_NAMESPACE = "kuberay-system"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                   "app.kubernetes.io/component": "kuberay-operator"}  # the kuberay-operator Helm chart's
# Ports Ray opens inside a cluster, beyond the declared ones: raylet/object manager/worker ports, the dashboard
# agent, a Serve replica's HTTP port.
RAY_INTERNAL_PORTS = {6379, 10001, 10002, 52365, 20000, 30000, DASHBOARD_PORT}


def ray_cluster_name(doc: dict) -> str:
    """The RayCluster a resource runs: a RayJob's or RayService's gets a generated name (name-xxxxx)."""
    name = doc["metadata"]["name"]
    return name if doc["kind"] == "RayCluster" else f"{name}-x7k2p"


def kuberay_pod_labels(doc: dict, group_name: str, group: dict) -> dict:
    """The labels of a Ray pod as KubeRay v1.7.0 sets them (common/pod.go labelPod): its own, overridden by the
    template's and the group's `labels`, except ray.io/node-type, ray.io/group and ray.io/cluster."""
    node_type = "head" if group_name == "headGroupSpec" else "worker"
    cluster = ray_cluster_name(doc)
    protected = {"ray.io/node-type": node_type, "ray.io/cluster": cluster,
                 "ray.io/group": "headgroup" if node_type == "head" else group["groupName"]}
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update((group["template"].get("metadata") or {}).get("labels") or {})
    labels.update(group.get("labels") or {})
    return {**labels, **protected}


def ray_pods() -> list[dict]:
    """One pod per Ray group of every RayCluster, RayJob and RayService, with the labels it gets."""
    pods = []
    for where, doc in all_documents():
        for path, cluster in ray_cluster_specs(doc):
            for group_name, group in groups(cluster):
                ports = {p.get("name"): p["containerPort"] for p in ray_container(group).get("ports", [])}
                pods.append({"name": f"{where} {group_name}", "namespace": NAMESPACE, "kind": doc["kind"],
                             "cluster": doc["metadata"]["name"], "labels": kuberay_pod_labels(doc, group_name, group),
                             "ports": ports})
    return pods


def other_pods() -> list[dict]:
    """Pods that are not Ray pods: the ones allowed in, and ones that must stay out."""
    def pod(name, namespace, labels):
        return {"name": name, "namespace": namespace, "labels": labels, "kind": None, "cluster": None, "ports": {}}
    pods = [pod("rayfine API server", NAMESPACE, API_SERVER_LABELS),
            pod("KubeRay operator", OPERATOR_NAMESPACE, OPERATOR_LABELS),
            pod("Prometheus", MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"}),
            pod("a pod of the namespace", NAMESPACE, {"run": "rayfine-inspect"}),
            pod("another rayfine pod", NAMESPACE, {"app.kubernetes.io/name": "rayfine",
                                                   "app.kubernetes.io/component": "shared-storage"}),
            pod("API server labels in another namespace", "default", API_SERVER_LABELS),
            pod("another pod of the operator's namespace", OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "webhook"}),
            pod("an ingress controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
            pod("a client outside the cluster", None, {})]
    for where, doc in docs_of_kind("RayJob"):
        template = doc["spec"].get("submitterPodTemplate")
        if template and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            labels = {**(template.get("metadata") or {}).get("labels", {}),
                      "ray.io/originated-from-cr-name": doc["metadata"]["name"],
                      "ray.io/originated-from-crd": "RayJob", "app.kubernetes.io/created-by": "kuberay-operator"}
            submitter = pod(f"{where} submitter", NAMESPACE, labels)
            submitter["submits_to"] = doc["metadata"]["name"]
            pods.append(submitter)
    return pods


def selector_matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        present, values = e["key"] in labels, e.get("values") or []
        ok = {"In": present and labels.get(e["key"]) in values, "NotIn": not (present and labels[e["key"]] in values),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def peer_admits(peer: dict, src: dict) -> bool:
    if "ipBlock" in peer:
        return True  # not modelled: count it as open to anyone
    if src["namespace"] is None:
        return False
    if "namespaceSelector" in peer:
        namespace_ok = selector_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src["namespace"]})
    else:
        namespace_ok = src["namespace"] == NAMESPACE
    return namespace_ok and selector_matches(peer.get("podSelector") or {}, src["labels"])


def port_admits(entry: dict, port: int, dst: dict) -> bool:
    if entry.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in entry:
        return True
    first = dst["ports"].get(entry["port"]) if isinstance(entry["port"], str) else entry["port"]
    return first is not None and first <= port <= entry.get("endPort", first)


def isolating_policies(policies: list[dict], dst: dict) -> list[dict]:
    return [np for np in policies if dst["namespace"] == NAMESPACE
            and "Ingress" in np["spec"].get("policyTypes", ["Ingress"])
            and selector_matches(np["spec"]["podSelector"], dst["labels"])]


def ingress_allowed(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Whether NetworkPolicies let src open a TCP connection to dst:port (policies add up; a pod no policy
    selects for ingress takes anything)."""
    selecting = isolating_policies(policies, dst)
    if not selecting:
        return True
    return any((not rule.get("from") or any(peer_admits(p, src) for p in rule["from"]))
               and (not rule.get("ports") or any(port_admits(e, port, dst) for e in rule["ports"]))
               for np in selecting for rule in np["spec"].get("ingress") or [])


def network_policies() -> list[dict]:
    return [doc for _, doc in docs_of_kind("NetworkPolicy")]


def candidate_ports(dst: dict) -> set[int]:
    return set(dst["ports"].values()) | RAY_INTERNAL_PORTS | METRICS_PORTS | {SERVE_PORT}


def outside_ingress_problems(policies: list[dict]) -> list[str]:
    """Every way into a Ray pod from outside its own Ray cluster, against what is declared: the serve port of a
    RayService pod from anywhere, the metrics ports from the monitoring namespace, a head's 8265 from the API
    server, the KubeRay operator and the RayJob's own submitter, the RayCluster's serve port from the API server
    (its models app). Nothing else, and all of these (the metrics
    ports the pod declares; the others of METRICS_PORTS may be open too, nothing listens there)."""
    problems = []
    for dst in ray_pods():
        for src in other_pods() + [p for p in ray_pods() if p["cluster"] != dst["cluster"]]:
            required = set()
            if dst["kind"] == "RayService" or (dst["kind"] == "RayCluster" and src["name"] == "rayfine API server"):
                required.add(SERVE_PORT)  # the RayCluster: the models app of `rayfine api`
            if dst["labels"]["ray.io/node-type"] == "head" and (
                    src["name"] in ("rayfine API server", "KubeRay operator")
                    or src.get("submits_to") == dst["cluster"]):
                required.add(DASHBOARD_PORT)
            permitted = set(required)
            if src["namespace"] == MONITORING_NAMESPACE:
                required |= METRICS_PORTS & set(dst["ports"].values())
                permitted |= METRICS_PORTS
            allowed = {port for port in candidate_ports(dst) if ingress_allowed(policies, src, dst, port)}
            if allowed - permitted:
                problems.append(f"{dst['name']}: {src['name']} reaches ports {sorted(allowed - permitted)}")
            if required - allowed:
                problems.append(f"{dst['name']}: {src['name']} cannot reach ports {sorted(required - allowed)}")
    return problems


def test_every_network_policy_selects_pods_of_this_deployment():
    policies = docs_of_kind("NetworkPolicy")
    assert policies, "no NetworkPolicy under k8s/"
    known = ray_pods() + other_pods()
    problems = []
    for where, np in policies:
        if (np["metadata"].get("namespace") or NAMESPACE) != NAMESPACE:
            problems.append(f"{where}: namespace {np['metadata']['namespace']}; the Ray pods are in {NAMESPACE}")
        if not any(selector_matches(np["spec"]["podSelector"], p["labels"]) for p in ray_pods()):
            problems.append(f"{where}: spec.podSelector selects no Ray pod (labels: the pod templates' plus "
                            "ray.io/node-type, ray.io/cluster, ray.io/group that KubeRay adds)")
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if "podSelector" in peer and not any(peer_admits(peer, p) for p in known):
                    problems.append(f"{where}: the peer {peer} matches no pod that exists")
    assert not problems, "\n".join(problems)


def test_every_ray_pod_is_isolated_by_a_default_deny_policy():
    policies = network_policies()
    problems = []
    for pod in ray_pods():
        selecting = isolating_policies(policies, pod)
        if not any(not np["spec"].get("ingress") for np in selecting):
            problems.append(f"{pod['name']} (labels {pod['labels']}): no default-deny ingress policy selects it")
    assert not problems, "\n".join(problems)


def test_ray_pods_reach_every_port_of_their_own_cluster_only():
    policies = network_policies()
    problems = []
    for dst in ray_pods():
        for src in ray_pods():
            same = src["cluster"] == dst["cluster"]
            for port in sorted(RAY_INTERNAL_PORTS | set(dst["ports"].values())):
                allowed = ingress_allowed(policies, src, dst, port)
                if same and not allowed:
                    problems.append(f"{dst['name']}: its own cluster's {src['name']} cannot reach port {port}")
                elif not same and allowed and port in RAY_INTERNAL_PORTS:
                    problems.append(f"{dst['name']}: {src['name']} of another cluster reaches port {port}")
    assert not problems, "\n".join(problems)


def test_outside_traffic_reaches_only_the_declared_ports():
    """The dashboard (8265) of a head only from the API server and operator selectors (and the RayJob's
    submitter); the serve pods only on 8000 (and metrics); metrics only from the monitoring namespace."""
    problems = outside_ingress_problems(network_policies())
    assert not problems, "\n".join(problems)


def test_serve_port_is_open_to_outside_clients():
    policies = network_policies()
    outside = [p for p in other_pods() if p["name"] in ("a client outside the cluster", "an ingress controller")]
    serve_pods = [p for p in ray_pods() if p["kind"] == "RayService"]
    assert {p["labels"]["ray.io/node-type"] for p in serve_pods} == {"head", "worker"}
    for dst in serve_pods:
        assert dst["ports"].get("serve") == SERVE_PORT, f"{dst['name']}: containerPort {SERVE_PORT} named serve"
        for src in outside:
            assert ingress_allowed(policies, src, dst, SERVE_PORT), f"{dst['name']}: {src['name']} cannot reach 8000"
            assert not ingress_allowed(policies, src, dst, DASHBOARD_PORT), f"{dst['name']}: 8265 open to {src}"


def test_prometheus_reaches_what_the_podmonitors_scrape():
    policies = network_policies()
    prometheus = next(p for p in other_pods() if p["name"] == "Prometheus")
    scraped = {monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"]:
               [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] for _, monitor in docs_of_kind("PodMonitor")}
    problems = []
    for dst in ray_pods():
        for name in scraped[dst["labels"]["ray.io/node-type"]]:
            if not ingress_allowed(policies, prometheus, dst, dst["ports"][name]):
                problems.append(f"{dst['name']}: Prometheus cannot scrape port {name} ({dst['ports'][name]})")
    assert not problems, "\n".join(problems)


def _policy(name: str, pod_selector: dict, ingress: list) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
            "spec": {"podSelector": pod_selector, "policyTypes": ["Ingress"], "ingress": ingress}}


@pytest.mark.parametrize("extra, expected", [
    (_policy("open-heads", {"matchLabels": {"ray.io/node-type": "head"}}, [{}]), "reaches ports"),
    (_policy("dashboard-from-namespace", {"matchLabels": {"ray.io/node-type": "head"}},
             [{"from": [{"podSelector": {}}], "ports": [{"port": 8265}]}]),
     "a pod of the namespace reaches ports [8265]"),
    (_policy("dashboard-by-name", {"matchLabels": {"ray.io/node-type": "head"}},
             [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "dashboard"}]}]), "reaches ports [8265]"),
    (_policy("serve-gcs", {"matchLabels": {"app.kubernetes.io/instance": "rayfine"}},
             [{"ports": [{"port": 6379}, {"port": 30000, "endPort": 31000}]}]), "reaches ports [6379, 30000]"),
    (_policy("metrics-anywhere", {"matchLabels": {"app.kubernetes.io/name": "rayfine"}},
             [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]), "reaches ports [8080]"),
], ids=["all-open", "dashboard-namespace", "dashboard-named-port", "serve-internal-ports", "metrics"])
def test_outside_ingress_check_catches(extra, expected):
    problems = outside_ingress_problems(network_policies() + [extra])
    assert any(expected in p for p in problems), f"expected a problem mentioning {expected!r}, got {problems}"


def test_outside_ingress_check_catches_a_missing_policy():
    policies = [np for np in network_policies() if np["metadata"]["name"] != "rayfine-ray-dashboard"]
    assert len(policies) == len(network_policies()) - 1
    problems = outside_ingress_problems(policies)
    assert any("KubeRay operator cannot reach ports [8265]" in p for p in problems), problems


# PodDisruptionBudget --------------------------------------------------------------------------------------------

def disruption_budget_problems(budgets: list[tuple[str, dict]]) -> list[str]:
    serve_workers = [p for p in ray_pods() if p["kind"] == "RayService" and p["labels"]["ray.io/node-type"] == "worker"]
    assert serve_workers
    most = sum(g.get("maxReplicas", 0) for g in the_one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    problems = []
    for where, pdb in budgets:
        spec = pdb["spec"]
        if pdb["apiVersion"] != "policy/v1":
            problems.append(f"{where}: apiVersion policy/v1")
        selected = [p["name"] for p in ray_pods() if selector_matches(spec["selector"], p["labels"])]
        missed = [p["name"] for p in serve_workers if p["name"] not in selected]
        extra = [name for name in selected if name not in {p["name"] for p in serve_workers}]
        if missed or extra or not selected:
            problems.append(f"{where}: selects {selected}; the serve workers are {[p['name'] for p in serve_workers]}")
        # RayCluster has no scale subresource: the disruption controller takes only an integer minAvailable.
        if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int) or spec["minAvailable"] < 1:
            problems.append(f"{where}: use an integer minAvailable >= 1 (the pods' owner, a RayCluster, has no "
                            "scale subresource, so maxUnavailable and percentages are not computed)")
        elif spec["minAvailable"] >= most:
            problems.append(f"{where}: minAvailable {spec['minAvailable']} with at most {most} serve workers "
                            "blocks every eviction, so no node of theirs can be drained")
    return problems


def test_serve_workers_have_a_disruption_budget():
    budgets = docs_of_kind("PodDisruptionBudget")
    assert budgets, "no PodDisruptionBudget under k8s/"
    problems = disruption_budget_problems(budgets)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["selector"]["matchLabels"].update({"app.kubernetes.io/component": "serve-workers"}), "selects []"),
    (lambda s: [s["selector"]["matchLabels"].pop(k) for k in ("ray.io/node-type", "app.kubernetes.io/component")],
     "rayservice.yaml#0 headGroupSpec"),
    (lambda s: s["selector"]["matchLabels"].update({"ray.io/cluster": "rayfine"}), "selects []"),
    (lambda s: s.update(maxUnavailable=1) or s.pop("minAvailable"), "integer minAvailable"),
    (lambda s: s.update(minAvailable="50%"), "integer minAvailable"),
    (lambda s: s.update(minAvailable=4), "blocks every eviction"),
], ids=["label-typo", "selects-head", "fixed-cluster-name", "max-unavailable", "percentage", "blocks-drains"])
def test_disruption_budget_check_catches(mutate, expected):
    where, budget = docs_of_kind("PodDisruptionBudget")[0]
    budget = copy.deepcopy(budget)
    mutate(budget["spec"])
    problems = disruption_budget_problems([(where, budget)])
    assert any(expected in p for p in problems), f"expected a problem mentioning {expected!r}, got {problems}"


# ---------------------------------------------------------------------------------------------------------------
# Grafana dashboard and README
# ---------------------------------------------------------------------------------------------------------------

def dashboard_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_grafana_dashboard_covers_training_and_serving():
    def unique(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"grafana-dashboard.json: duplicate keys {keys}"
        return dict(pairs)

    dashboard = json.loads((K8S_DIR / "monitoring" / "grafana-dashboard.json").read_text(), object_pairs_hook=unique)
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]
    assert all(p["targets"] for p in panels if p["type"] != "row"), "a panel without a query"
    for metric in DASHBOARD_METRICS:
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs), f"no panel queries {metric}"
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        if "_bucket" in expr:
            assert "histogram_quantile(" in expr and re.search(r"by \(le\b", expr), expr
        for counter in re.findall(r"\b\w+_total\b", expr):
            assert re.search(rf"(rate|increase)\({counter}\b", expr), f"counter used without rate(): {expr}"
    for counter in ("ray_rayfine_serve_requests_total", "ray_rayfine_serve_errors_total"):
        assert any(counter in e and "endpoint" in e and "status" in e for e in exprs), f"{counter} by endpoint/status"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "cluster"} <= names


def test_readme_walks_through_every_manifest_and_secret():
    readme = (K8S_DIR / "README.md").read_text()
    for path in manifest_files() + [K8S_DIR / "monitoring" / "grafana-dashboard.json", K8S_DIR / "Dockerfile"]:
        assert str(path.relative_to(REPO_ROOT)) in readme, f"k8s/README.md never mentions {path.name}"
    secrets = set()
    for _, doc in all_documents():
        for node in walk(doc):
            ref = node.get("secretKeyRef") or node.get("secretRef")
            if isinstance(ref, dict) and not ref.get("optional"):
                secrets.add(ref["name"])
            if isinstance(node.get("authOptions"), dict):
                secrets.add(node["authOptions"]["secretName"])
    for name in secrets:
        assert re.search(rf"create secret generic {name}\b", readme), f"k8s/README.md: how to create Secret {name}?"
    for needed in ("helm install", "--version 1.7.0", "rayfine submit", "/v1/classify", "Authorization: Bearer",
                   "port-forward"):
        assert needed in readme, f"k8s/README.md never mentions {needed!r}"

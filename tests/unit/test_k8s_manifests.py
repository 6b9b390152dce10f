"""Checks of the Kubernetes manifests in k8s/, without a cluster and without a running Ray.

Every YAML document under k8s/ is validated: RayCluster, RayJob and RayService (ray.io/v1) against the
openAPIV3Schema of the official KubeRay v1.7.0 CRDs, kept in tests/unit/schemas/kuberay/, made strict (the API
server prunes unknown fields silently, so a typo like ``rayStartParam`` would otherwise be dropped without a word);
ConfigMap, PersistentVolumeClaim, Secret, Service, PodMonitor and ServiceMonitor against the small hand-written
schemas in tests/unit/schemas/. On top of the schemas: the rules the KubeRay operator enforces when it reconciles,
and the project's own contracts (Ray version pin, resources, token auth, the run config, the Serve app, metrics).
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
                "raycluster.yaml", "monitoring/podmonitor.yaml", "monitoring/grafana-dashboard.json", "Dockerfile",
                "README.md"]
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
    core = [(where, d) for where, d in all_documents() if d.get("apiVersion") == "v1"]
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
], ids=["configmap-typo", "metadata-typo", "pvc-typo", "podmonitor-typo", "service-type", "unknown-kind"])
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
    assert "pip install -r requirements.txt" in text and "pip install --no-deps ." in text
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    needed |= {"pyproject.toml", "requirements.txt", pyproject["project"].get("readme", "pyproject.toml")}
    copied = {Path(src).name for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              for src in line.split()[:-1] if not src.startswith("--")}
    assert needed <= copied, f"k8s/Dockerfile does not COPY {sorted(needed - copied)}"
    ignore = (K8S_DIR / "Dockerfile.dockerignore").read_text().split()
    unignored = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed <= unignored, f"k8s/Dockerfile.dockerignore filters out {sorted(needed - unignored)}"


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
            for key in ("cpu", "memory"):
                if key not in requests or key not in limits:
                    problems.append(f"{where} {path} {c['name']}: needs resources.requests and limits for {key}")
                elif quantity(requests[key]) > quantity(limits[key]):
                    problems.append(f"{where} {path} {c['name']}: {key} request above its limit")
            for key in set(requests) | set(limits):
                if "/" in key and quantity(requests.get(key, 0)) != quantity(limits.get(key, 0)):
                    problems.append(f"{where} {path} {c['name']}: extended resource {key} needs request == limit")
    assert not problems, "\n".join(problems)


def test_token_auth_is_on_for_every_ray_cluster():
    problems, secrets = [], set()
    for where, cluster, _ in all_ray_cluster_specs():
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{where}: authOptions.mode must be token (the Jobs API runs any code it is given)")
        if version_tuple(str(cluster.get("rayVersion", "0"))) < (2, 52, 0):
            problems.append(f"{where}: token auth needs rayVersion 2.52.0 or later")
        secrets.add(auth.get("secretName"))
        for _, pod in pod_specs(cluster):
            for c in containers(pod):
                for env in c.get("env", []):
                    if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                        problems.append(f"{where} {c['name']}: RAY_AUTH_MODE={env.get('value')!r}")
    assert len(secrets) == 1 and None not in secrets, f"one shared token Secret expected, got {secrets}"
    assert not problems, "\n".join(problems)


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
    assert service["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling") is True
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

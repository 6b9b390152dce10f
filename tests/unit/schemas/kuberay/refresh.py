"""Refresh the KubeRay CRD schemas the manifest tests validate against.

    python tests/unit/schemas/kuberay/refresh.py v1.7.0            # from GitHub, a KubeRay release tag
    python tests/unit/schemas/kuberay/refresh.py path/to/crd/bases  # from a folder holding ray.io_*.yaml

For each CRD (RayCluster, RayJob, RayService) it keeps the ``openAPIV3Schema`` of the served ``v1`` version, drops
the ``description`` texts (documentation only, most of the bytes) and writes ``<plural>.v1.json`` beside this
script. Update the version named in README.md beside it.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ("rayclusters", "rayjobs", "rayservices")
RAW_URL = "https://raw.githubusercontent.com/ray-project/kuberay/{tag}/ray-operator/config/crd/bases/ray.io_{name}.yaml"


def strip_descriptions(node):
    if isinstance(node, dict):
        # "description" is a documentation key of a schema, but also a property *name* inside "properties".
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def read_crd(source: str, name: str) -> str:
    folder = Path(source)
    if folder.is_dir():
        return (folder / f"ray.io_{name}.yaml").read_text()
    with urllib.request.urlopen(RAW_URL.format(tag=source, name=name), timeout=60) as response:
        return response.read().decode()


def main(source: str) -> None:
    for name in CRDS:
        crd = yaml.safe_load(read_crd(source, name))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served"))
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        (HERE / f"{name}.v1.json").write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{name}.v1.json: {len(json.dumps(schema)) // 1024} KiB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

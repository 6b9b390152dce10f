"""The package layers of docs/architecture.md, enforced: core is the base, training and serving build on it and
never import each other, cluster is the top layer; no import cycles; Ray is started in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "cluster", "training", "serving")


def test_import_linter_contracts_are_kept():
    """The contracts live in pyproject.toml ([tool.importlinter]); function-level imports count too."""
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 kept, 0 broken" in run.stdout


def _calls(name: str) -> list[str]:
    """``file:line`` of every call to a function called ``name`` in the product packages."""
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    func = node.func
                    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                    if called == name:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_ray_is_started_in_one_place():
    assert [c.split(":")[0] for c in _calls("init") if "ray" in Path(REPO / c.split(":")[0]).read_text()] == [
        "core/ray_connect.py", "core/ray_connect.py"]  # ray.init: a cluster, or a local instance
    assert [c.split(":")[0] for c in _calls("connect") if not c.startswith("cluster/api/store.py")] == [
        "cluster/ray_start.py"]


def test_private_ray_apis_live_in_one_module():
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name == "ray_private.py":
                continue
            text = path.read_text()
            for needle in ("ray._private", "ray._raylet", "_get_global_client", "_get_serve_request_context",
                           "ray.core.generated"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders

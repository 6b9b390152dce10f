"""The package layers of docs/architecture.md, enforced: core is the base, training and serving build on it and
never import each other, cluster is the top layer; no import cycles; Ray is started in one place."""

from __future__ import annotations

import re
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


def _occurrences(pattern: str) -> list[str]:
    """Files of the product packages whose code matches ``pattern``."""
    return sorted(str(path.relative_to(REPO)) for package in PACKAGES for path in (REPO / package).rglob("*.py")
                  if re.search(pattern, path.read_text()))


def test_ray_is_started_in_one_place():
    """ray.init lives in core.ray_connect.connect, and only the top layer's start_ray calls connect."""
    assert _occurrences(r"\bray\.init\(") == ["core/ray_connect.py"]
    assert _occurrences(r"(?<![\w.])connect\(") == ["cluster/ray_start.py", "core/ray_connect.py"]


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


def test_the_train_backend_config_loads_without_torch():
    """Ray Train's controller unpickles the trainer's backend config and calls its backend: with
    ``core.ray_private.TorchBackendConfig`` neither imports torch there (Ray's own TorchConfig does), and it
    tells Ray Train what TorchConfig tells it."""
    import pickle

    from ray.train.torch import TorchConfig

    from core.ray_private import TorchBackendConfig

    ours, ray_s = TorchBackendConfig("gloo"), TorchConfig(backend="gloo")
    assert ours.to_dict() == ray_s.to_dict() and ours.framework == ray_s.framework
    assert ours.backend_cls.share_cuda_visible_devices == ray_s.backend_cls.share_cuda_visible_devices
    code = ("import pickle, sys; import ray.train.v2._internal.execution.controller; "
            f"config = pickle.loads({pickle.dumps(ours)!r}); config.backend_cls(); config.train_func_context; "
            "config.framework; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]

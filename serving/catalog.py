"""Which models a multi-model app answers: model id -> model folder, from a fixed list or a registry file.

``rayfine serve RUN1/model RUN2/model`` passes a fixed list. ``rayfine api`` keeps a registry file in its run
storage (a folder every Ray node reads) and rewrites it whenever a job succeeds or a model is deleted; replicas
re-read it when its modification time changes, so a new model answers without a redeploy and a deleted one
stops answering at once. The registry::

    {"version": 1,
     "serve": {<serve: section of the app>},
     "models": {"ft:tiny-lm::ftjob-abc": {"path": "/storage/ftjob-abc/model", "owned_by": "user"},
                "tiny-lm": {"path": "/models/tiny-llama", "owned_by": "system"}}}

Model ids are only ever looked up in that mapping: nothing a client sends becomes part of a path. JSON only
here (no torch): the API server writes registries with the same code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

from core.errors import UserError
from serving.model_folder import ModelSpec, load_model_spec

REGISTRY_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    model_id: str
    path: str
    owned_by: str = "user"
    created: int = 0


def write_registry(path: str | Path, models: dict[str, dict[str, Any]], serve: dict[str, Any]) -> None:
    """Write a registry atomically (a replica reading it mid-write sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"version": REGISTRY_VERSION, "serve": serve, "models": models}
    fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_registry(path: str | Path) -> dict[str, Any]:
    """The registry document; UserError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: model registry not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a valid model registry ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise UserError(f"{path}: not a model registry (expected {{\"version\": 1, \"models\": {{...}}}})")
    return document


class ModelCatalog:
    """Model id -> entry, from ``models`` (fixed) and the registry file (re-read when it changes)."""

    def __init__(self, models: Optional[dict[str, Any]] = None, registry: Optional[str] = None):
        self.fixed = {mid: _entry(mid, value) for mid, value in (models or {}).items()}
        self.registry = registry
        self._registry_entries: dict[str, CatalogEntry] = {}
        self._stamp: Optional[tuple[int, int]] = None
        self._lock = threading.Lock()
        self._specs: dict[CatalogEntry, ModelSpec] = {}

    def entries(self) -> dict[str, CatalogEntry]:
        self._refresh()
        return {**self._registry_entries, **self.fixed}

    def get(self, model_id: str) -> Optional[CatalogEntry]:
        return self.entries().get(model_id)

    def spec(self, entry: CatalogEntry) -> ModelSpec:
        """The entry's folder read as a model folder, under the entry's id (read once per entry)."""
        spec = self._specs.get(entry)
        if spec is None:
            path = entry.path
            if path.startswith("package:"):  # a base model shipped as a Python package (rayfine api's configs)
                from core.config import resolve_model_path

                path = resolve_model_path(path, Path.cwd())
            spec = self._specs[entry] = dataclasses.replace(load_model_spec(path), model_id=entry.model_id)
        return spec

    def _refresh(self) -> None:
        if not self.registry:
            return
        try:
            stat = os.stat(self.registry)
        except OSError:
            return  # keep what was read last: a registry being replaced, or storage briefly away
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                document = read_registry(self.registry)
            except UserError:
                return
            self._registry_entries = {mid: _entry(mid, value) for mid, value in document["models"].items()}
            self._stamp = stamp


def _entry(model_id: str, value: Any) -> CatalogEntry:
    if isinstance(value, (str, os.PathLike)):
        return CatalogEntry(model_id, str(value))
    return CatalogEntry(model_id, str(value["path"]), str(value.get("owned_by", "user")),
                        int(value.get("created", 0)))

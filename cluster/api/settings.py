"""What a ``rayfine api`` server is: its base models, where it keeps state, and its limits.

A base model is a run config the operator wrote (task, model, data settings, training defaults, scaling; no
``data.train`` needed: each job supplies its files). Its
API name is ``NAME`` in ``NAME=path/config.yaml``, else the file's stem. API users pick a base model by name
and may change only the OpenAI hyperparameters; everything else comes from the operator's config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.config import RunConfig, ServeConfig, load_config
from core.errors import UserError

# A base name is part of ``ft:BASE:SUFFIX:JOBID``, so it must not contain ':'.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BaseModel:
    name: str
    config_path: Path
    config: RunConfig
    created_at: int
    model_reference: Optional[str] = None  # the config's own ``package:MODULE/DIR`` form, resolved per machine


@dataclass
class ApiSettings:
    """Everything ``build_app`` needs. Paths are absolute."""

    base_models: dict[str, BaseModel]
    data_dir: Path
    storage: Path
    address: Optional[str] = None
    api_keys_env: str = "RAYFINE_API_KEYS"
    max_upload_bytes: int = 512 * 2**20
    poll_interval_s: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: frozenset[str] = field(default_factory=frozenset)
    db_file: Optional[Path] = None  # the SQLite file when not DATA_DIR/api.sqlite3 (e.g. on local disk)
    max_active_jobs_per_key: int = 8  # 0: no cap
    driver_cpus: float = 1.0  # CPUs each job's driver reserves on the cluster (0: none)
    mlflow_uri: Optional[str] = None  # every job's run tracked in this MLflow store (experiment rayfine-api)
    wandb_mode: str = "online"  # the mode of the W&B runs of jobs created with a wandb integration
    serve: ServeConfig = field(default_factory=ServeConfig)  # the models app's serve: section (--set serve.*)
    serve_url: str = "http://127.0.0.1:8000"  # the cluster's Serve HTTP ingress
    serve_models: bool = True  # deploy the models app and answer inference (off in tests of the jobs API alone)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def db_path(self) -> Path:
        return self.db_file or self.data_dir / "api.sqlite3"


def parse_base_model_arg(arg: str) -> tuple[str, Path]:
    """``NAME=path/config.yaml`` or ``path/config.yaml`` (the name is then the file's stem)."""
    name, sep, path = arg.partition("=")
    if not sep:
        name, path = Path(arg).stem, arg
    return name.strip(), Path(path.strip()).expanduser()


def load_base_models(args: list[str]) -> dict[str, BaseModel]:
    """Load every base config; raise UserError listing all problems (bad names, duplicates, bad configs)."""
    if not args:
        raise UserError("rayfine api: give at least one base model config, e.g. rayfine api ray_config.yaml "
                        "or rayfine api minilm=ray_config.yaml")
    models: dict[str, BaseModel] = {}
    problems: list[str] = []
    for arg in args:
        name, path = parse_base_model_arg(arg)
        if not NAME_PATTERN.match(name):
            problems.append(f"{arg}: model name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it becomes "
                            "part of ft:BASE:SUFFIX:JOBID); name it with NAME=path/config.yaml")
            continue
        if name in models:
            problems.append(f"{arg}: the model name {name!r} is given twice; name one with NAME=path/config.yaml")
            continue
        try:
            cfg = load_config(path, data_optional=True)  # each job brings its files
        except UserError as exc:
            problems.append(exc.render())
            continue
        models[name] = BaseModel(name, path.resolve(), cfg, int(path.stat().st_mtime), _package_reference(path))
    if problems:
        raise UserError(problems, header="rayfine api: problems with the base model configs:")
    return models


def _package_reference(path: Path) -> Optional[str]:
    """``model.name_or_path`` as written in the file when it is ``package:...``: load_config resolved it to a
    folder on this machine, which may not be where the cluster has the package installed."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        name = (raw.get("model") or {}).get("name_or_path")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith("package:") else None

"""``rayfine serve``: deploy a model folder on Ray Serve, or write the equivalent Serve config file.

    rayfine serve runs/my_run/model [--set serve.port=8080] [--detach]
    rayfine serve my_run.yaml                    # serves output.dir/output.name/model with its serve: section
    rayfine serve my_run.yaml --config-out serve.yaml   # for `serve deploy` or a RayService serveConfigV2
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import ValidationError

from cluster.ingress import LABELS, active_ingress, check_ingress
from cluster.ray_start import start_ray
from core.config import ServeConfig, load_config, parse_overrides
from core.errors import ConfigError, UserError
from core.run_folder import RunFolder


def serve_command(target: str, overrides: list[str], address: str | None, detach: bool,
                  config_out: str | None) -> int:
    """The ``rayfine serve`` verb. Returns the exit code."""
    from serving.deploy import endpoints_for, shutdown, write_serve_config
    from serving.model_folder import load_model_spec

    model_dir, cfg, trust_remote_code = resolve_target(target, overrides)
    if config_out:
        write_serve_config(model_dir, cfg, config_out, trust_remote_code=trust_remote_code)
        print(f"wrote {config_out}: run it with `serve deploy {config_out}` on a cluster where rayfine is "
              "installed, or embed it in a RayService's serveConfigV2")
        return 0
    spec = load_model_spec(model_dir)  # a folder that cannot be served fails before Ray starts
    where = start_ray(address, serve_proxy=cfg.proxy)
    url = deploy_and_check(model_dir, cfg, trust_remote_code=trust_remote_code, address=address)
    ingress = LABELS.get(active_ingress() or "", "unknown")
    print(f"Serving {spec.model_id} ({spec.task}) on {where} at {url} (HTTP ingress: {ingress})")
    for path in endpoints_for(spec.task):
        print(f"  {url}{path}")
    if os.environ.get(cfg.api_keys_env):
        print(f"  auth: on (Authorization: Bearer KEY, keys from ${cfg.api_keys_env})")
    if detach:
        if not (address or os.environ.get("RAY_ADDRESS")):
            print("note: --detach with a local Ray instance: serving stops when this command exits; "
                  "start a cluster (`ray start --head`) and pass --address to keep it running")
        return 0
    print("Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `docker stop`, `kill`: stop as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
        shutdown()
    return 0


def deploy_and_check(model_dir: Path, cfg: ServeConfig, *, trust_remote_code: bool, address: str | None) -> str:
    """Deploy on the running Ray and warn when its ingress is not ``serve.proxy`` (a running instance keeps
    the one it started with); returns the base URL."""
    from serving.deploy import deploy

    url = deploy(model_dir, cfg, trust_remote_code=trust_remote_code, address=address)
    check_ingress(cfg.proxy)
    return url


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def resolve_target(target: str, overrides: list[str]) -> tuple[Path, ServeConfig, bool]:
    """A model folder (with ``serve.*`` overrides), a run or tune folder (its ``model/``: for a tune folder the
    best trial's), or a run config (serving its run folder's model)."""
    path = Path(target).expanduser()
    if path.is_dir():
        run = RunFolder(path)
        if not (path / "config.json").exists() and (run.model / "config.json").exists():
            path = run.model
        return path.resolve(), serve_config_from_overrides(overrides), False
    if path.is_file():
        cfg = load_config(path, overrides)
        model_dir = RunFolder(cfg.run_dir).model
        if not model_dir.is_dir():
            raise UserError(f"{target}: no exported model at {model_dir}; run `rayfine train {target}` first, "
                            "or pass the model folder itself")
        return model_dir.resolve(), cfg.serve, cfg.model.trust_remote_code or cfg.serve.trust_remote_code
    raise UserError(f"{target}: not found; pass a model folder (RUN/model) or a run config YAML")


def serve_config_from_overrides(overrides: list[str]) -> ServeConfig:
    """The default ``serve:`` section with ``--set serve.KEY=VALUE`` applied (the only keys that apply), checked
    by the same rules as a run config's serve section."""
    raw = parse_overrides(overrides)
    other = sorted(key for key in raw if key != "serve")
    if other:
        raise ConfigError([f"--set {key}...: only serve.* keys apply when serving a model folder"
                           for key in other])
    try:
        return ServeConfig.model_validate(raw.get("serve") or {})
    except ValidationError as exc:
        raise ConfigError([_serve_problem(e) for e in exc.errors()], header="Bad --set override:") from None


def _serve_problem(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return f"serve.{'.'.join(str(p) for p in err['loc'])}: unknown key; valid keys are " \
               f"{', '.join(ServeConfig.model_fields)}"
    if err["type"] == "value_error" and not err["loc"]:  # a rule across keys (ServeConfig's own check)
        return err["msg"].removeprefix("Value error, ")
    return f"serve.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err['input']!r})"

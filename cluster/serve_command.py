"""``rayfine serve``: deploy a model folder on Ray Serve, or write the equivalent Serve config file.

    rayfine serve runs/my_run/model [--set serve.port=8080] [--detach]
    rayfine serve my_run.yaml                    # serves output.dir/output.name/model with its serve: section
    rayfine serve my_run.yaml --config-out serve.yaml   # for `serve deploy` or a RayService serveConfigV2
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from cluster.ingress import LABELS, active_ingress, check_ingress
from cluster.ray_start import (
    group_members,
    local_raylet_pids,
    signalled_with_us,
    start_ray,
    started_local_instance,
    stop_local_ray,
    within,
)
from core import collector
from core.config import ServeConfig, deep_merge, load_config, parse_overrides
from core.errors import ConfigError, UserError
from core.openai_errors import DIGESTS_SUFFIX
from core.ray_connect import is_local
from core.run_folder import RunFolder

logger = logging.getLogger(__name__)

# How long stopping waits for Serve to remove the app (a replica drains for 2 s on a local instance) before it
# goes on without it: Ray's processes may have been stopped with ours.
SERVE_SHUTDOWN_DEADLINE_S = 15.0


@dataclass
class ServeTarget:
    """What ``rayfine serve`` deploys: one model folder, or a multi-model app (model folders and/or a registry)."""

    cfg: ServeConfig
    model_dir: Optional[Path] = None
    models: dict[str, Path] = field(default_factory=dict)
    registry: Optional[Path] = None
    trust_remote_code: bool = False


def serve_command(targets: list[str] | str, overrides: list[str], address: str | None, detach: bool,
                  config_out: str | None, name: str = "rayfine") -> int:
    """The ``rayfine serve`` verb. Returns the exit code."""
    from serving.deploy import endpoints_for, write_serve_config
    from serving.model_folder import load_model_spec

    target = resolve_targets([targets] if isinstance(targets, str) else list(targets), overrides)
    cfg = target.cfg
    if config_out:
        if target.model_dir is None:
            raise UserError("--config-out writes the Serve config of one model folder; pass one")
        write_serve_config(target.model_dir, cfg, config_out, name=name, trust_remote_code=target.trust_remote_code)
        print(f"wrote {config_out}: run it with `serve deploy {config_out}` on a cluster where rayfine is "
              "installed, or embed it in a RayService's serveConfigV2")
        return 0
    spec = load_model_spec(target.model_dir) if target.model_dir else None  # fails before Ray starts
    if spec is not None and spec.task == "causal_lm" and not spec.adapter:
        from serving.engine import plan_for_model

        plan_for_model(str(spec.path), cfg, target.trust_remote_code)  # a serve key it cannot run with, too
    check_port_free(cfg, address)
    where = start_ray(address, serve_proxy=cfg.proxy)
    with stopping_cleanly() as stop:
        url = deploy_and_check(target, name=name, address=address)
        ingress = LABELS.get(active_ingress() or "", "unknown")
        if spec is not None:
            print(f"Serving {spec.model_id} ({spec.task}) on {where} at {url} (HTTP ingress: {ingress})")
        else:
            what = f"the models of {target.registry}" if target.registry else ", ".join(target.models)
            print(f"Serving {what} on {where} at {url} (HTTP ingress: {ingress}); each request names its model "
                  f"in the body's \"model\", loaded on its first request (at most "
                  f"{cfg.max_models_per_replica} per replica)")
        for path in endpoints_for(spec.task if spec else None):
            print(f"  {url}{path}")
        if os.environ.get(cfg.api_keys_env) or os.environ.get(cfg.api_keys_env + DIGESTS_SUFFIX):
            print(f"  auth: on (Authorization: Bearer KEY, keys from ${cfg.api_keys_env})")
        if detach:
            if is_local(address):
                print("note: --detach with a local Ray instance: serving stops when this command exits; "
                      "start a cluster (`ray start --head`) and pass --address to keep it running")
                stop_local_ray()
            return 0
        wait_for_stop(stop, "Ctrl-C to stop")
    return stop.code


def check_port_free(cfg: ServeConfig, address: str | None) -> None:
    """On a local instance rayfine is about to start, ``serve.port`` must be free: say so before Ray starts
    (a cluster's head, or a Ray this process already runs with Serve on the port, is not checked here)."""
    import ray

    if not is_local(address) or ray.is_initialized():
        return
    problem = _listen_problem(cfg.host, cfg.port)
    if problem:
        free = next((p for p in range(cfg.port + 1, min(cfg.port + 100, 65536))
                     if not _listen_problem(cfg.host, p)), cfg.port + 1)
        raise UserError(f"serve.port {cfg.port} on {cfg.host} is already in use ({problem}): another server holds "
                        f"it (an earlier `rayfine serve`?). Stop it, or pick another port with --set "
                        f"serve.port={free}")


def _listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now (None: it could). A port in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@dataclass
class Stop:
    serving: bool = False  # whether the server was up (waiting for a stop) when it was stopped
    code: int = 0  # the exit code: 0 when stopped while serving, 130 when stopped before


@contextmanager
def stopping_cleanly() -> Iterator[Stop]:
    """From here on SIGTERM (`docker stop`, `kill`, a supervisor) acts as Ctrl-C, and either one, at any point
    of the block, stops within a deadline: the apps this process deployed are removed, and a local instance is
    shut down with every process it left (its HAProxy included). The previous SIGTERM handler is restored after."""
    stop = Stop()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield stop
    except KeyboardInterrupt:
        print("stopping", flush=True)
        stop.code = 0 if stop.serving else 130
        stop_serving(stop.code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_stop(stop: Stop, hint: str) -> None:
    """Serve until Ctrl-C or SIGTERM (inside ``stopping_cleanly``)."""
    print(hint, flush=True)
    stop.serving = True
    collector.resume()  # the command's start-up is over (core.collector)
    while True:
        time.sleep(3600)


def stop_serving(exit_code: int = 0) -> None:
    """Remove the apps this process deployed (and stop Serve when none is left); for a local instance also
    stop Ray and what it left. A second Ctrl-C skips the wait for Serve. When Ray's processes were gone, the
    process ends here with ``exit_code`` (Ray's exit handler would hang on them)."""
    from serving.deploy import shutdown

    local = started_local_instance()
    raylets = local_raylet_pids()  # now: once the raylet is reaped its pid says nothing
    members = group_members() if local else []
    answered = False
    try:
        answered = within(SERVE_SHUTDOWN_DEADLINE_S, shutdown, give_up=lambda: signalled_with_us(members))
        if not answered:
            logger.warning("Ray's processes were stopped along with this one (or Serve did not stop within "
                           "%.0fs): stopping what is left of them", SERVE_SHUTDOWN_DEADLINE_S)
    except KeyboardInterrupt:
        pass
    if local and not stop_local_ray(raylets, ray_alive=answered):
        # Ray's own shutdown, which would run again at exit, hangs on an instance that is gone; all of it stopped.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def deploy_and_check(target: ServeTarget, *, name: str = "rayfine", address: str | None) -> str:
    """Deploy on the running Ray and warn when its ingress is not ``serve.proxy`` (a running instance keeps
    the one it started with); returns the base URL."""
    from serving.deploy import deploy

    url = deploy(target.model_dir, target.cfg, name=name, trust_remote_code=target.trust_remote_code,
                 address=address, models=target.models, registry=target.registry)
    check_ingress(target.cfg.proxy)
    return url


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def resolve_targets(targets: list[str], overrides: list[str]) -> ServeTarget:
    """One target (``resolve_target``), a model registry (``models.json``, its serve section with ``--set``
    applied), or several model folders (a multi-model app; each served under its model id)."""
    if len(targets) == 1 and targets[0].endswith(".json") and Path(targets[0]).is_file():
        from serving.catalog import read_registry

        registry = Path(targets[0]).expanduser().resolve()
        document = read_registry(registry)
        return ServeTarget(serve_config_from_overrides(overrides, document.get("serve") or {}), registry=registry)
    if len(targets) == 1:
        model_dir, cfg, trust_remote_code = resolve_target(targets[0], overrides)
        return ServeTarget(cfg, model_dir=model_dir, trust_remote_code=trust_remote_code)
    from serving.model_folder import load_model_spec

    models: dict[str, Path] = {}
    for target in targets:
        path = Path(target).expanduser()
        if not path.is_dir():
            raise UserError(f"{target}: not a model folder; several targets must each be a model folder (RUN/model) "
                            "or a run folder")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            path = RunFolder(path).model
        spec = load_model_spec(path)
        if spec.model_id in models:
            raise UserError(f"{target}: its model id {spec.model_id!r} is also the id of {models[spec.model_id]}; "
                            "each model needs its own id (rayfine.json's model_id, or the folder's name)")
        models[spec.model_id] = spec.path
    return ServeTarget(serve_config_from_overrides(overrides), models=models)


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


def serve_config_from_overrides(overrides: list[str], base: Optional[dict] = None) -> ServeConfig:
    """The ``serve:`` section (``base``, else the defaults) with ``--set serve.KEY=VALUE`` applied (the only keys
    that apply), checked by the same rules as a run config's serve section."""
    raw = parse_overrides(overrides)
    other = sorted(key for key in raw if key != "serve")
    if other:
        raise ConfigError([f"--set {key}...: only serve.* keys apply when serving a model folder"
                           for key in other])
    try:
        return ServeConfig.model_validate(deep_merge(base or {}, raw.get("serve") or {}))
    except ValidationError as exc:
        raise ConfigError([_serve_problem(e) for e in exc.errors()], header="Bad --set override:") from None


def _serve_problem(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return f"serve.{'.'.join(str(p) for p in err['loc'])}: unknown key; valid keys are " \
               f"{', '.join(ServeConfig.model_fields)}"
    if err["type"] == "value_error" and not err["loc"]:  # a rule across keys (ServeConfig's own check)
        return err["msg"].removeprefix("Value error, ")
    return f"serve.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err['input']!r})"

"""Deploying a model folder on a running Ray (Serve started if needed), or writing the equivalent Serve config.

The ``rayfine serve`` verb (``cluster.serve_command``) starts or joins Ray, then calls ``deploy``; ``rayfine
serve ... --config-out FILE`` calls ``write_serve_config`` (for ``serve deploy`` or a RayService's
``serveConfigV2``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml

from core.config import ServeConfig
from core.errors import UserError
from core.openai_errors import DIGESTS_SUFFIX, read_api_key_digests
from core.ray_private import HAPROXY_ENV, PROXY_CALLBACK_ENV, serve_http_port
from serving.app import DEPLOYMENT_NAME, bind_app, bind_models_app, deployment_options
from serving.errors import PROXY_CALLBACK
from serving.model_folder import ENDPOINT_TASKS, load_model_spec

logger = logging.getLogger(__name__)

APP_NAME = "rayfine"
IMPORT_PATH = "serving.app:build_app"
# Serve's own timeout (the Python proxy's, or with HAProxy the replica's HTTP server's) is a backstop for a
# wedged replica; the app answers 408 at request_timeout_s.
PROXY_TIMEOUT_GRACE_S = 2.0

_deployed: dict[str, str] = {}  # apps this process deployed -> their base URLs (for shutdown, readiness)


def endpoints_for(task: Optional[str]) -> list[str]:
    """The paths a model folder of ``task`` answers (None: a multi-model app, every task's)."""
    return ["/healthz", "/v1/models"] + [path for path, needs in ENDPOINT_TASKS.items() if task in (None, needs)]


def deploy(model_dir: Optional[Path], serve_cfg: ServeConfig, *, name: str = APP_NAME,
           trust_remote_code: bool = False, address: Optional[str] = None, timeout_s: float = 300.0,
           models: Optional[dict[str, Path]] = None, registry: Optional[Path] = None) -> str:
    """Deploy (or update) the app serving ``model_dir`` (or, without it, the multi-model app of ``models``, id ->
    folder, and the ``registry`` file) on the Ray this process is connected to; wait until /healthz answers;
    return the base URL (``address``: the cluster's, to name its host in the URL).

    Starts Serve with ``serve_cfg``'s HTTP options unless it is already running (then its proxy's options
    stay, and the URL uses its port). The keys in the env var named by ``serve.api_keys_env`` (and the digests in
    ``{serve.api_keys_env}_SHA256``) reach the replicas as SHA-256 digests in ``{serve.api_keys_env}_SHA256`` of
    their ``runtime_env`` (Ray's dashboard and ``serve status`` show runtime envs, so never the keys
    themselves); replicas also read the env var when it is set on the Ray nodes.
    """
    from ray import serve

    port = start_serve(serve_cfg)
    digests = read_api_key_digests(serve_cfg.api_keys_env)
    env_vars = {serve_cfg.api_keys_env + DIGESTS_SUFFIX: ",".join(sorted(digests))} if digests else None
    if model_dir is not None:
        app, what = bind_app(model_dir, serve_cfg, trust_remote_code, env_vars), str(model_dir)
    else:
        app = bind_models_app(models or {}, registry, serve_cfg, trust_remote_code, env_vars)
        what = str(registry) if registry else ", ".join(str(p) for p in (models or {}).values())
    try:
        serve.run(app, name=name, route_prefix=serve_cfg.route_prefix, blocking=False,
                  logging_config={"enable_access_log": False})  # ours: one JSON line per request
    except RuntimeError as exc:
        reason = _deployment_error(name) or _tail(str(exc))
        serve.delete(name)
        raise UserError(f"{what}: the model server failed to start: {reason}\n"
                        "(the replica's full traceback is in Ray's logs)") from None
    url = f"http://{_public_host(serve_cfg.host, address)}:{port}{serve_cfg.route_prefix.rstrip('/')}"
    _deployed[name] = url
    # HAProxy rebuilds every route when one app changes, and another app's route can 404 for a moment while
    # it does: the deploy is done when every app this process deployed answers again.
    # Skipped: apps removed since (serve.delete, a shutdown) and apps that are not RUNNING (they have their own
    # trouble; waiting for them here would fail this deploy).
    running = {app for app, state in serve.status().applications.items() if state.status == "RUNNING"}
    wait_until_healthy([url, *(other for app, other in _deployed.items() if app != name and app in running)],
                       timeout_s)
    return url


def start_serve(cfg: ServeConfig) -> int:
    """Start Serve's proxy with our HTTP options (no-op when running); return the port it listens on."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port,
                              "request_timeout_s": cfg.request_timeout_s + PROXY_TIMEOUT_GRACE_S})
    try:
        return serve_http_port()
    except Exception:  # noqa: BLE001 - fall back to what we asked for
        return cfg.port


def wait_until_healthy(urls: str | list[str], timeout_s: float, in_a_row: int = 6) -> None:
    """Wait until every ``url``/healthz answers 200 ``in_a_row`` rounds in a row, 0.25 s apart: HAProxy reloads
    its routes when an app is deployed, and a route can answer once, then 404 while the reload settles (three
    rounds, 0.75 s, were once not enough: the new app's route answered 404 right after)."""
    import httpx

    urls = [urls] if isinstance(urls, str) else urls
    deadline, last, ok = time.monotonic() + timeout_s, "no answer", 0
    while time.monotonic() < deadline:
        try:
            codes = {url: httpx.get(f"{url}/healthz", timeout=5.0).status_code for url in urls}
            failing = [f"{url}/healthz: HTTP {code}" for url, code in codes.items() if code != 200]
            ok = 0 if failing else ok + 1
            if ok >= in_a_row:
                return
            last = failing[0] if failing else last
        except httpx.HTTPError as exc:
            ok, last = 0, type(exc).__name__
        time.sleep(0.25)
    raise UserError(f"{', '.join(urls)}: /healthz did not answer within {timeout_s:.0f}s (last: {last})")


def shutdown(name: Optional[str] = None) -> None:
    """Remove the app ``name`` (default: every app this process deployed); stop Serve if none is left."""
    from ray import serve

    names = [name] if name else list(_deployed)
    for app in names:
        serve.delete(app)
        _deployed.pop(app, None)
    if names and not serve.status().applications:
        serve.shutdown()


def _public_host(host: str, address: Optional[str]) -> str:
    """The host clients use: the cluster's when we joined one by address, else this machine's."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        parsed = urlparse(address if "://" in address else f"ray://{address}")
        if parsed.hostname and parsed.hostname not in ("127.0.0.1", "localhost"):
            return parsed.hostname
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _tail(text: str, lines: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _deployment_error(app: str) -> str | None:
    """The last line of the replica's traceback, which Serve keeps in the deployment's status message."""
    from ray import serve

    try:
        deployment = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
    except Exception:  # noqa: BLE001 - only a nicer message is lost
        return None
    lines = [line for line in (deployment.message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


# ---- the equivalent Serve config file --------------------------------------------------------------------

_CONFIG_HEADER = """\
# Ray Serve config for {model_id} ({task}), written by `rayfine serve ... --config-out`.
# Deploy with `serve deploy {path}` (Ray cluster with rayfine installed), or copy `applications` and
# `http_options` into a KubeRay RayService's spec.serveConfigV2.
# - model_dir must exist on every Ray node (shared volume or baked into the image).
# - API keys: set ${api_keys_env} (comma-separated) in the Ray containers' env, e.g. from a Kubernetes
#   Secret; keys never go in this file.
# - JSON error bodies for Serve's own 503/408: set
#   {callback_env}={callback} in the Ray containers' env.
# - HTTP ingress (serve.proxy: {proxy}) is not part of this file: Serve reads it from the Ray containers' env
#   when Ray starts: {haproxy_env}={haproxy_value}.
"""


def build_serve_config(model_dir: Path, cfg: ServeConfig, *, name: str = APP_NAME,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """The ``serve deploy`` / ``serveConfigV2`` document for ``model_dir`` served with ``cfg``."""
    options = deployment_options(cfg)
    deployment = {"name": DEPLOYMENT_NAME, **options}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port,
                         "request_timeout_s": cfg.request_timeout_s + PROXY_TIMEOUT_GRACE_S},
        "applications": [{
            "name": name,
            "route_prefix": cfg.route_prefix,
            "import_path": IMPORT_PATH,
            "args": {"model_dir": str(model_dir), "serve": cfg.model_dump(mode="json"),
                     "trust_remote_code": trust_remote_code},
            "logging_config": {"enable_access_log": False},
            "deployments": [deployment],
        }],
    }


def write_serve_config(model_dir: Path, cfg: ServeConfig, path: str | Path, *, name: str = APP_NAME,
                       trust_remote_code: bool = False) -> None:
    from ray.serve.schema import ServeDeploySchema

    spec = load_model_spec(model_dir)
    document = build_serve_config(spec.path, cfg, name=name, trust_remote_code=trust_remote_code)
    ServeDeploySchema.model_validate(document)  # what `serve deploy` will check, checked now
    header = _CONFIG_HEADER.format(model_id=spec.model_id, task=spec.task, path=path,
                                   api_keys_env=cfg.api_keys_env, proxy=cfg.proxy, haproxy_env=HAPROXY_ENV,
                                   callback_env=PROXY_CALLBACK_ENV, callback=PROXY_CALLBACK,
                                   haproxy_value="1" if cfg.proxy == "haproxy" else "0")
    Path(path).write_text(header + yaml.safe_dump(document, sort_keys=False))

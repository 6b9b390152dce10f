"""``rayfine api CONFIG [CONFIG ...]``: run the fine-tuning jobs server until Ctrl-C.

The server keeps its state in ``--data-dir`` (SQLite and the uploaded files) and has the cluster write run
folders to ``--storage``. Both must be storage the Ray cluster shares with this server (the same machine,
or one volume mounted on the server and on every Ray node): jobs read the uploaded files from there, and the
server reads their ``metrics.jsonl`` and checkpoints back.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.api.settings import ApiSettings, load_base_models
from core import collector
from core.errors import UserError
from core.openai_errors import read_api_keys

logger = logging.getLogger("cluster.api")
DEFAULT_DATA_DIR = "~/.rayfine/api"


def settings_from_args(args: argparse.Namespace) -> ApiSettings:
    """ApiSettings from the CLI's arguments; UserError on bad configs or limits."""
    if args.max_upload_mb is not None and args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb: must be a positive number of megabytes (got {args.max_upload_mb})")
    if not 0 < args.port < 65536:
        raise UserError(f"--port: must be 1-65535 (got {args.port})")
    if getattr(args, "max_active_jobs", 0) < 0 or getattr(args, "driver_cpus", 0) < 0:
        raise UserError("--max-active-jobs and --driver-cpus: must be 0 or more")
    keys = read_api_keys(args.api_keys_env)
    if not keys and not is_loopback(args.host) and not getattr(args, "insecure", False):
        raise UserError(f"--host {args.host}: without API keys anyone who reaches this port could upload files and "
                        f"start jobs on the cluster; set ${args.api_keys_env} (comma-separated keys), or pass "
                        "--insecure to listen anyway (a trusted network only)")
    from cluster.serve_command import serve_config_from_overrides

    serve = serve_config_from_overrides(list(getattr(args, "overrides", None) or []))
    data_dir = Path(args.data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    storage = Path(args.storage).expanduser().resolve() if args.storage else data_dir / "runs"
    return ApiSettings(
        base_models=load_base_models(list(args.configs)), data_dir=data_dir, storage=storage,
        address=args.address, api_keys_env=args.api_keys_env, host=args.host, port=args.port,
        max_upload_bytes=int(float(args.max_upload_mb or 512) * 2**20), api_keys=keys,
        db_file=Path(args.db_path).expanduser().resolve() if getattr(args, "db_path", None) else None,
        max_active_jobs_per_key=getattr(args, "max_active_jobs", 8), driver_cpus=getattr(args, "driver_cpus", 1.0),
        serve=serve, serve_url=getattr(args, "serve_url", None) or default_serve_url(args.address, serve.port),
        serve_models=getattr(args, "serve_models", True), mlflow_uri=getattr(args, "mlflow_uri", None),
        wandb_mode=getattr(args, "wandb_mode", "online"))


def default_serve_url(address: str | None, port: int) -> str:
    """The Serve ingress of the cluster whose Jobs API is ``address``: the same host, ``serve.port``."""
    from urllib.parse import urlparse

    from cluster.jobs import jobs_address

    host = urlparse(jobs_address(address)).hostname or "127.0.0.1"
    return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _configure_logging() -> None:
    """Job transitions go to stdout, one timestamped line each."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _banner(settings: ApiSettings, where: str) -> str:
    url = f"http://{settings.host}:{settings.port}/v1"
    lines = [f"rayfine api: OpenAI-compatible fine-tuning jobs on {where}",
             f"  listening on {url}  (openai.OpenAI(base_url=\"{url}\", api_key=...))",
             "  base models:"]
    for m in settings.base_models.values():
        cfg = m.config
        lines.append(f"    {m.name:<24} {cfg.task}, {cfg.model.name_or_path} ({m.config_path})")
    lines += [f"  data: {settings.data_dir}  (state: {settings.db_path})", f"  run folders: {settings.storage}"]
    if settings.mlflow_uri:
        lines.append(f"  tracking: every job's run in MLflow at {settings.mlflow_uri} (experiment rayfine-api)")
    if settings.serve_models:
        lines.append(f"  inference: /v1/chat/completions, /v1/completions, /v1/classify, /v1/ner, /v1/qa by model id, "
                     f"served by the Ray Serve app rayfine-models at {settings.serve_url}")
    if settings.api_keys:
        lines.append(f"  auth: on (Authorization: Bearer KEY, keys from ${settings.api_keys_env})")
    else:
        lines.append(f"  auth: OFF: ${settings.api_keys_env} is not set, so anyone who reaches this port can "
                     "upload files and start jobs")
    return "\n".join(lines)


def api_command(args: argparse.Namespace) -> int:
    """Check the configs and the cluster, then serve until Ctrl-C."""
    import uvicorn

    from cluster.api.app import build_app
    from cluster.jobs import JobsClient

    settings = settings_from_args(args)
    # UserError (exit 1) if the cluster cannot be reached at start (a wrong address is caught here); once
    # running, the server waits out a cluster that goes away.
    client = JobsClient(settings.address)
    settings.storage.mkdir(parents=True, exist_ok=True)
    app = build_app(settings, jobs_client=client)  # UserError: another server holds this state
    _configure_logging()
    print(_banner(settings, client.address), flush=True)
    collector.resume()  # the command's start-up is over (core.collector)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    print("rayfine api: stopped", flush=True)
    return 0

"""Connecting to Ray: the cluster at --address / RAY_ADDRESS, else a local instance."""

from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger(__name__)


def local_num_cpus(num_workers: int = 1) -> int:
    """Logical CPUs for a local Ray instance.

    Ray Train reserves one CPU per worker and Ray Data only schedules on what is left. On a 2-core laptop
    with 2 workers that would leave nothing to read and tokenize with, so the local instance advertises
    one more logical CPU than the workers take; the workers themselves run one torch thread per core.
    """
    cores = os.cpu_count() or 1
    return max(cores, num_workers + 1)


def connect(address: str | None = None, num_workers: int = 1, serve_proxy: str | None = None) -> str:
    """Start or join Ray and return a description of where we are running.

    Workers' own logs stay in Ray's log folder unless RAYFINE_VERBOSE=1: the terminal shows the run's
    progress (printed by the driver), not per-worker library chatter.
    """
    import ray

    # Ray Serve's proxy answers its own errors (timeouts, overload) in OpenAI's error shape.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serving.errors:proxy_middlewares")
    verbose = os.environ.get("RAYFINE_VERBOSE", "") not in ("", "0")
    if not verbose:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    if ray.is_initialized():
        return "existing Ray session"
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers started by a local instance inherit this process's environment.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        configure_logging=True,
    )
    if address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    # Serve's HTTP ingress is fixed when Ray starts: serve.proxy's default (HAProxy) unless the env already
    # chose (RAY_SERVE_ENABLE_HA_PROXY) or no HAProxy binary is installed; see cluster.ingress.
    from cluster.ingress import use_ingress

    use_ingress(serve_proxy)  # serve.proxy of the run's config: `rayfine run` serves on the Ray it trains on
    # "local": a new instance even when `ray start` runs on this machine (join one with --address).
    ray.init(address="local", num_cpus=local_num_cpus(num_workers), include_dashboard=False, **kwargs)
    return f"local Ray ({local_num_cpus(num_workers)} logical CPUs)"

"""Connecting to Ray: the cluster at --address / RAY_ADDRESS, else a new local instance.

Only the top layer (``cluster``) calls ``connect``, once per command, before it calls into ``training`` or
``serving``; library code assumes Ray is up.
"""

from __future__ import annotations

import logging
import os
import warnings

from core.errors import UserError
from core.ray_private import LOCAL_TRAIN_POLL_INTERVAL_S, PREEMPTION_WATCHER_ENV, TRAIN_POLL_INTERVAL_ENV

logger = logging.getLogger(__name__)


def local_num_cpus(num_workers: int = 1) -> int:
    """Logical CPUs for a local Ray instance.

    Ray Train reserves one CPU per worker and Ray Data only schedules on what is left. On a 2-core laptop
    with 2 workers that would leave nothing to read and tokenize with, so the local instance advertises
    one more logical CPU than the workers take; the workers themselves run one torch thread per core.
    """
    cores = os.cpu_count() or 1
    return max(cores, num_workers + 1)


def is_local(address: str | None) -> bool:
    """Whether ``connect(address)`` starts (or has started) a local instance rather than joining a cluster."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def connect(address: str | None = None, num_workers: int = 1) -> str:
    """Start or join Ray and return a description of where we are running.

    Workers' own logs stay in Ray's log folder unless RAYFINE_VERBOSE=1: the terminal shows the run's
    progress (printed by the driver), not per-worker library chatter.
    """
    import ray

    verbose = os.environ.get("RAYFINE_VERBOSE", "") not in ("", "0")
    if not verbose:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
        # Ray Data's note that a small split has fewer blocks than the tokenizing task pool could use.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    if ray.is_initialized():
        quiet_ray_data()
        return "existing Ray session"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        prepare_local_env()
    kwargs = dict(
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        configure_logging=True,
    )
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ValueError, ConnectionError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--address {address} (or RAY_ADDRESS): Ray cannot join it: {reason}\n  Pass the "
                            "cluster's GCS address (HOST:6379, or auto on one of its nodes) or a Ray Client address "
                            "(ray://HOST:10001); the dashboard's http://HOST:8265 is for rayfine submit, status, "
                            "stop and api.") from None
        where = f"Ray cluster at {address}"
    else:
        # "local": a new instance even when `ray start` runs on this machine (join one with --address).
        from core.ray_private import lean_local_instance

        with lean_local_instance(log_monitor=verbose):
            ray.init(address="local", num_cpus=local_num_cpus(num_workers), include_dashboard=False, **kwargs)
        where = f"local Ray ({local_num_cpus(num_workers)} logical CPUs)"
    quiet_ray_data()
    return where


def prepare_local_env() -> None:
    """Settings for the processes of a local instance, which inherit this process's environment when it starts
    Ray (a cluster's nodes have their own): one tokenizer thread per process, Ray Train V2, Train controllers that
    poll their workers often and watch no node for preemption (see ``core.ray_private``). Values already set
    win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault(TRAIN_POLL_INTERVAL_ENV, LOCAL_TRAIN_POLL_INTERVAL_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def quiet_ray_data() -> None:
    """Ray Data progress bars and per-operator logs drown the run's own progress on a terminal."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False

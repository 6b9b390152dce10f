"""Rank-aware, quiet output: progress comes from rank 0 or the driver, in one place."""

from __future__ import annotations

import logging
import sys


def print0(*args, rank: int = 0, **kwargs) -> None:
    """Print from rank 0 only (pass the caller's world rank)."""
    if rank == 0:
        print(*args, **kwargs, flush=True)


def quiet_ray_data() -> None:
    """Ray Data progress bars and per-operator logs drown the run's own progress on a terminal."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

"""How many train workers a run gets, and where: ``scaling.num_workers: auto`` resolved on the Ray it runs on.

On GPUs, one worker per GPU (each drives its card; gradients go over NCCL). On CPU-only nodes, one worker per
node using every core of it: a step's matrix work already spreads over the cores as threads, while more
processes per node each get fewer threads and exchange gradients over gloo every step (measured by
``benchmarks/train_overhead.py``). A resumed run keeps the count it started with: its DeepSpeed checkpoint and
its data order are laid out for that many ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.config import RunConfig, load_config
from core.run_folder import RunFolder

logger = logging.getLogger(__name__)


def resolve_use_gpu(cfg: RunConfig) -> bool:
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.scaling.use_gpu)


def workers_text(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


@dataclass(frozen=True)
class Workers:
    count: int
    spread: bool  # one per node: Ray Train places them with the SPREAD strategy
    reason: str  # why this count, for the run's log


def choose_workers(cfg: RunConfig) -> Workers:
    """The worker count for ``cfg`` on the connected Ray (``num_workers`` as given when it is a number)."""
    if cfg.scaling.num_workers != "auto":
        return Workers(cfg.scaling.num_workers, False, "scaling.num_workers")
    kept = resumed_worker_count(cfg)
    if kept:
        return Workers(kept, False, "auto: the count this resumed run started with")
    import ray

    if resolve_use_gpu(cfg):
        per_worker = (cfg.scaling.resources_per_worker or {}).get("GPU", 1) or 1
        gpus = ray.cluster_resources().get("GPU", 0)
        count = max(1, int(gpus // per_worker))
        return Workers(count, False, f"auto: one per GPU ({gpus:g} in the cluster)")
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    count = max(1, len(nodes))
    cores = ", ".join(f"{int(n['Resources']['CPU'])}" for n in nodes)
    where = "this node" if count == 1 else f"each of {count} nodes"
    return Workers(count, count > 1, f"auto: no GPU, so one worker on {where} using every core "
                                     f"(logical CPUs: {cores})")


def resolve_workers(cfg: RunConfig) -> tuple[RunConfig, Workers]:
    """``cfg`` with ``scaling.num_workers`` a number, and the choice (logged once by the caller)."""
    workers = choose_workers(cfg)
    if cfg.scaling.num_workers == workers.count:
        return cfg, workers
    scaling = cfg.scaling.model_copy(update={"num_workers": workers.count})
    return cfg.model_copy(update={"scaling": scaling}), workers


def resumed_worker_count(cfg: RunConfig) -> int | None:
    """The worker count in the config of the unfinished run this command resumes (None: a new run)."""
    folder = RunFolder(cfg.run_dir.expanduser().resolve())
    if not folder.checkpoints.exists() or folder.model.exists() or not folder.config.exists():
        return None
    try:
        count = load_config(folder.config).scaling.num_workers
    except Exception:  # noqa: BLE001 - an unreadable earlier config: choose afresh
        return None
    return count if isinstance(count, int) else None

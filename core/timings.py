"""Start-up timings (``RAYFINE_TIMINGS=1``): when each phase before the first optimizer step ended.

The driver marks its own phases (Ray start or connect, the pre-flight data pass, the run folder, the
tokenized datasets, the call into Ray Train); rank 0 of the workers records when it started, when its DeepSpeed
engine was built, when its first batch arrived and when its first optimizer step ended, and sends them with its
first report (``startup`` in the first metrics.jsonl record). ``startup_table`` lays them out from the start of
the process: what each phase took, and when the first step was done.
"""

from __future__ import annotations

import os
import time

ENV = "RAYFINE_TIMINGS"
_marks: list[tuple[float, str]] = []  # (when the phase ended, its name)

# What rank 0 sends, in the order its phases run: (key, name)
WORKER_PHASES = (("worker_start", "Train controller, worker group, torch process group"),
                 ("engine_built", "model load + DeepSpeed engine"),
                 ("first_batch", "first batch of data"),
                 ("first_step", "first optimizer step"))


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def mark(name: str, at: float | None = None) -> None:
    """Record that the phase ``name`` ended now (or at ``at``, seconds since the epoch)."""
    if enabled():
        _marks.append((time.time() if at is None else at, name))


def process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def startup_table(worker: dict[str, float] | None = None) -> str:
    """The phases marked so far (and rank 0's ``worker`` timestamps), each with when it ended and what it took,
    counted from the start of this process."""
    marks = list(_marks) + [(worker[key], name) for key, name in WORKER_PHASES if worker and key in worker]
    marks.sort()
    start = process_start()
    lines = [f"Start-up ({ENV}=1): seconds from the start of the command", f"  {'phase':<55}{'took':>7}{'at':>8}"]
    previous = start
    for at, name in marks:
        lines.append(f"  {name:<55}{at - previous:>7.1f}{at - start:>8.1f}")
        previous = at
    return "\n".join(lines)


def reset() -> None:
    _marks.clear()

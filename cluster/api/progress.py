"""A job's run folder, read as OpenAI events and checkpoints.

The training driver appends one JSON line per report to ``RUN/metrics.jsonl`` (step, epoch, loss, lr,
total_steps, eval_* metrics, ``final``) and Ray Train keeps the latest checkpoints in
``RUN/checkpoints/checkpoint_*/`` with rank 0's ``trainer_state.json`` (global_step, finished). The API server
reads both from shared storage (the same machine, or a volume mounted on the head node and on the server).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core.run_folder import RunFolder

logger = logging.getLogger(__name__)


def metrics_data(record: dict[str, Any], total_steps: Optional[int]) -> dict[str, Any]:
    """OpenAI's metrics event ``data``: train_loss, full_valid_* (we evaluate on the whole validation set)."""
    data: dict[str, Any] = {"step": record.get("step"), "total_steps": total_steps}
    for key, name in (("epoch", "epoch"), ("loss", "train_loss"), ("lr", "learning_rate"),
                      ("samples_per_second", "samples_per_second")):
        if isinstance(record.get(key), (int, float)):
            data[name] = record[key]
    for key, value in record.items():
        if key.startswith("eval_") and isinstance(value, (int, float)) and key != "eval_num_examples":
            data["full_valid_" + key.removeprefix("eval_")] = value
    if record.get("final"):
        data["final"] = True
    return data


def metrics_message(data: dict[str, Any]) -> str:
    """``Step 4/32: training loss=0.6931, validation loss=0.5012, accuracy=0.9000``."""
    step, total = data.get("step"), data.get("total_steps")
    parts = []
    if "train_loss" in data:
        parts.append(f"training loss={data['train_loss']:.4f}")
    evals = sorted(((k.removeprefix("full_valid_"), v) for k, v in data.items() if k.startswith("full_valid_")),
                   key=lambda kv: kv[0] != "loss")  # the loss first, then the task's metrics
    if evals:
        label = "final validation" if data.get("final") else "validation"
        parts.append(f"{label} " + ", ".join(f"{k}={v:.4f}" for k, v in evals))
    where = f"Step {step}/{total}" if total else f"Step {step}"
    return f"{where}: " + (", ".join(parts) if parts else "progress")


def estimate_finish(first: tuple[int, float], last: tuple[int, float], total_steps: int) -> Optional[int]:
    """The Unix time at which step ``total_steps`` is reached at the pace from ``first`` to ``last`` (step, time);
    None until two reports some steps apart give a pace."""
    (step0, time0), (step1, time1) = first, last
    if step1 <= step0 or time1 <= time0:
        return None
    return int(round(time1 + (time1 - time0) / (step1 - step0) * max(total_steps - step1, 0)))


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    finished: bool
    created_at: int


def scan_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints now in the run folder, oldest first (a half-copied one is skipped until done)."""
    found = []
    for state_path in RunFolder(run_dir).trainer_states():
        try:
            state = json.loads(state_path.read_text())
            found.append(CheckpointInfo(state_path.parent.name, int(state["global_step"]),
                                        bool(state.get("finished")), int(state_path.stat().st_mtime)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda c: (c.step, c.created_at))


def checkpoint_metrics(events: list[dict[str, Any]], step: int, wait: bool = True) -> Optional[dict[str, Any]]:
    """A checkpoint's metrics from the metrics events up to its step: the latest training loss and the
    evaluation at that step. With ``wait``, None while no event has reached that step yet."""
    if wait and (not events or max(e["step"] or 0 for e in events) < step):
        return None
    metrics: dict[str, Any] = {"step": step}
    for event in events:
        data = event["data"] or {}
        if "train_loss" in data:
            metrics["train_loss"] = data["train_loss"]
        if event["step"] == step:
            metrics.update({k: v for k, v in data.items() if k.startswith("full_valid_")})
    if "full_valid_loss" in metrics:
        metrics["valid_loss"] = metrics["full_valid_loss"]
    return metrics

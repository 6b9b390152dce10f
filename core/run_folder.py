"""The run folder (``output.dir/output.name``): one place for its layout.

    config.yaml          the resolved config
    metrics.jsonl        one JSON line per report (step, epoch, loss, lr, throughput, eval metrics)
    checkpoints/         Ray Train checkpoints (each: DeepSpeed shards ``ds/`` and rank 0's trainer_state.json)
    model/               the exported Hugging Face folder (see ``core.model_folder``)
    adapter/             LoRA runs: the peft adapter folder
    eval.json            final metrics per split
    plots/               training curves (PNG)
    samples.jsonl        causal LM: greedy generations from validation prompts
    tune_results.csv     tune runs: one row per trial

Training writes it; the CLI, the jobs API and serving read it back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL = "model"
ADAPTER = "adapter"
EVAL = "eval.json"
PLOTS = "plots"
SAMPLES = "samples.jsonl"
TUNE_RESULTS = "tune_results.csv"
# Written by rank 0 into every checkpoint: where training stands (global_step, epoch, finished, ...).
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def tune_results(self) -> Path:
        return self.root / TUNE_RESULTS

    def trainer_states(self) -> list[Path]:
        """``trainer_state.json`` of every checkpoint, oldest first."""
        return sorted(self.checkpoints.glob(f"checkpoint_*/{TRAINER_STATE}"))


def read_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The records of ``metrics.jsonl`` in the complete lines after byte ``offset``; returns them and the offset
    after the last complete line. A last line still being written is left for the next read; a line that is not a
    JSON object (one cut short by a crash before a resume) is skipped with a warning."""
    if not Path(path).is_file():
        return [], offset
    records = []
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # being written; read it next time
            offset += len(raw)
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif raw.strip():
                logger.warning("%s: skipping a line that is not a JSON record", path)
    return records, offset

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

from dataclasses import dataclass
from pathlib import Path

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

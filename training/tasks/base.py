"""The task adapter seam: what differs between tasks, and nothing else (``TaskAdapter``).

The data pipeline, the DeepSpeed train loop, evaluation and export are shared. A task supplies:

- ``parse_record``: check one raw record and normalize it into the task's columns (or say what is wrong);
- ``tokenize``: turn a batch of normalized records into model inputs (runs in Ray Data actors);
- ``collate``: pad a batch of tokenized rows into tensors (runs in the train workers);
- ``auto_model`` and ``model_kwargs``: the Hugging Face model class with the task's head, and its arguments;
- ``eval_outputs``: from one evaluation batch and the model's outputs to small per-example results
  (gathered from every rank);
- ``compute_metrics``: from all per-example results to the task's metrics.

``collate`` returns the model's inputs including its loss targets, so ``model(**inputs).loss`` is the
training loss for every task. The optional hooks (labels, pre-flight stats and report lines, tokenizer
preparation) have defaults on ``TaskAdapter``; a task overrides what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from core.config import RunConfig


@dataclass
class LabelSpace:
    """Labels seen in the training split, in id order. ``numeric`` keeps int labels sorted as ints."""

    names: list[str] = field(default_factory=list)
    numeric: bool = False

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_counts(cls, counts: dict[str, int], numeric: bool) -> "LabelSpace":
        key = (lambda s: int(s)) if numeric else (lambda s: s)
        return cls(sorted(counts, key=key), numeric)


class ParseError(ValueError):
    """A record-level problem; the message names the field and the fix."""


def pad_sequences(seqs: list[np.ndarray], pad_value: int, length: int | None = None) -> np.ndarray:
    """Right-pad ragged int sequences to the longest (or ``length``)."""
    width = length or max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), pad_value, dtype=np.int64)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = seq[:width]
    return out


def padded_inputs(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """``input_ids`` padded to the longest row, its ``attention_mask``, and ``token_type_ids`` when present."""
    ids = list(batch["input_ids"])
    out = {"input_ids": pad_sequences(ids, pad_id),
           "attention_mask": (pad_sequences(ids, -1) != -1).astype(np.int64)}
    if "token_type_ids" in batch:
        out["token_type_ids"] = pad_sequences(list(batch["token_type_ids"]), 0)
    return out


def label_head_kwargs(labels: LabelSpace) -> dict:
    """``from_pretrained`` arguments of a classification head over ``labels`` (saved in config.json)."""
    return {"num_labels": len(labels.names), "id2label": dict(enumerate(labels.names)),
            "label2id": labels.label2id}


def text_field(record: dict[str, Any], column: str, option: str, required: bool = True) -> str:
    """A non-empty string column, or a ParseError naming the column and the config key."""
    if column not in record:
        if not required:
            return ""
        cols = ", ".join(sorted(record)) or "none"
        raise ParseError(f"missing column '{column}' ({option}); columns are {cols}")
    value = record[column]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ParseError(f"'{column}' is empty")
    if not isinstance(value, str):
        raise ParseError(f"'{column}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ParseError(f"'{column}' is empty")
    return value


class TaskAdapter:
    """What a task supplies to the shared pipeline. Subclasses set the class attributes and implement the
    methods that raise NotImplementedError; the others are defaults for optional hooks."""

    name: str = ""
    auto_model: str = ""  # the transformers Auto class of the task's head, e.g. AutoModelForSequenceClassification
    has_labels: bool = False  # records carry class labels (counted in pre-flight, saved with the model)
    label_option: str = "data.label_column"  # the config key that names the labels, for messages
    reference_pass: bool = False  # the loop scores every record with the initial model before training (DPO)

    def __init__(self, cfg: "RunConfig"):
        self.cfg = cfg
        self.data = cfg.data

    # ---- records ---------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """One raw record, checked and normalized into the task's columns; ParseError names the problem."""
        raise NotImplementedError

    @staticmethod
    def empty_record() -> dict[str, Any]:
        """The task's columns for a record that failed ``parse_record`` (kept, to report it)."""
        raise NotImplementedError

    @staticmethod
    def record_labels(batch: dict[str, np.ndarray]) -> list[list[str]]:
        """The label strings of each record (tasks with labels): by default its ``label``."""
        return [[str(x)] for x in batch["label"]]

    @staticmethod
    def build_label_space(counts: dict[str, int]) -> LabelSpace:
        """The label space from the training split's label counts: sorted, as ints when all are ints."""
        return LabelSpace.from_counts(counts, all(str(x).lstrip("-").isdigit() for x in counts))

    def record_stats(self, batch: dict[str, np.ndarray], tokenizer) -> dict[str, np.ndarray]:
        """Per-record counts that pre-flight sums per split: ``rows`` (the tokenized rows each record becomes)
        plus any checks of the task's own."""
        return {"rows": np.ones(len(next(iter(batch.values()))), dtype=np.int64)}

    def report_lines(self, summary) -> list[str]:
        """Extra lines of the ``rayfine validate`` report."""
        return []

    # ---- tokens and model ------------------------------------------------------------------------
    @staticmethod
    def prepare_tokenizer(tokenizer) -> None:
        """Adjust the tokenizer before use (saved with the export), e.g. a chat template."""

    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def empty_tokens() -> dict[str, Any]:
        """What ``tokenize`` gives for a batch with no usable record (the task's columns, no rows)."""
        return {"input_ids": [], "length": np.zeros(0, dtype=np.int32), "labels": np.zeros(0, np.int64)}

    def model_kwargs(self, labels: LabelSpace | None) -> dict[str, Any]:
        """``from_pretrained`` arguments of the task's head."""
        return {}

    @staticmethod
    def prepare_model(model) -> None:
        """Adjust the model before the engine wraps it (e.g. no dropout)."""

    def forward(self, model, inputs: dict):
        """The model's outputs on a collated batch; ``.loss`` is what training minimizes."""
        return model(**inputs)

    @staticmethod
    def batch_metrics(outputs) -> dict[str, float]:
        """Training metrics of one micro-batch besides the loss, averaged over the logging window."""
        return {}

    def eval_outputs(self, batch: dict[str, np.ndarray], inputs: dict, outputs) -> list[dict]:
        raise NotImplementedError

    def compute_metrics(self, results: list[dict], label_space: LabelSpace | None) -> dict:
        raise NotImplementedError

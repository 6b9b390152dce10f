"""The task adapter seam: what differs between tasks, and nothing else.

The data pipeline, the DeepSpeed train loop, evaluation and export are shared. A task supplies:

- ``parse_record``: check one raw record and normalize it into the task's columns (or say what is wrong);
- ``tokenize``: turn a batch of normalized records into model inputs (runs in Ray Data actors);
- ``collate``: pad a batch of tokenized rows into tensors (runs in the train workers);
- ``build_model``: the Hugging Face model with the task's head;
- ``eval_outputs``: from one evaluation batch and the model's outputs to small per-example results
  (gathered from every rank);
- ``compute_metrics``: from all per-example results to the task's metrics.

``collate`` returns the model's inputs including its loss targets, so ``model(**inputs).loss`` is the
training loss for every task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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

"""Text (and text-pair) classification: sentiment, topic, NLI-style pairs."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.metrics import classification_metrics
from training.tasks.base import LabelSpace, ParseError, TaskAdapter, label_head_kwargs, padded_inputs, text_field


class SequenceClassification(TaskAdapter):
    name = "sequence_classification"
    has_labels = True
    auto_model = "AutoModelForSequenceClassification"

    # ---- records -------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        d = self.data
        text = text_field(record, d.text_column, "data.text_column")
        pair = text_field(record, d.text_pair_column, "data.text_pair_column") if d.text_pair_column else ""
        if d.label_column not in record:
            cols = ", ".join(sorted(record))
            raise ParseError(f"missing column '{d.label_column}' (data.label_column); columns are {cols}")
        label = record[d.label_column]
        if isinstance(label, bool) or not isinstance(label, (str, int, np.integer)):
            if isinstance(label, float) and label.is_integer():
                label = int(label)
            else:
                raise ParseError(f"'{d.label_column}' must be a string or an integer, got {label!r}")
        if isinstance(label, str) and not label.strip():
            raise ParseError(f"'{d.label_column}' is empty")
        return {"text": text, "text_pair": pair, "label": str(label)}

    @staticmethod
    def empty_record() -> dict[str, Any]:
        return {"text": "", "text_pair": "", "label": ""}

    # ---- tokens --------------------------------------------------------------------------------
    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        texts = list(batch["text"])
        pairs = list(batch["text_pair"]) if self.data.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=truncate,
                        max_length=self.data.max_seq_length if truncate else None)
        ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
        out = {"input_ids": ids, "length": np.array([len(x) for x in ids], dtype=np.int32)}
        if "token_type_ids" in enc:
            out["token_type_ids"] = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
        if labels is not None:
            lookup = labels.label2id
            out["labels"] = np.array([lookup.get(str(x), -1) for x in batch["label"]], dtype=np.int64)
        return out

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        return padded_inputs(batch, pad_id) | {"labels": np.asarray(batch["labels"], dtype=np.int64)}

    # ---- model and metrics ---------------------------------------------------------------------
    def model_kwargs(self, labels: LabelSpace) -> dict[str, Any]:
        return label_head_kwargs(labels)

    @staticmethod
    def eval_outputs(batch: dict[str, np.ndarray], inputs: dict, outputs) -> list[dict]:
        preds = outputs.logits.argmax(-1).cpu().numpy()
        golds = inputs["labels"].cpu().numpy()
        return [{"pred": int(p), "gold": int(g)} for p, g in zip(preds, golds)]

    @staticmethod
    def compute_metrics(results: list[dict], label_space: LabelSpace) -> dict:
        preds = np.array([r["pred"] for r in results], dtype=np.int64)
        golds = np.array([r["gold"] for r in results], dtype=np.int64)
        return classification_metrics(preds, golds, label_space.names)

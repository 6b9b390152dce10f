"""Reading an exported model folder (the contract of ``core.model_folder``) before loading its weights.

Which task it does, its served id, its labels and limits: from ``rayfine.json`` (``ModelInfo``), else
inferred from ``config.json``'s ``architectures`` or a LoRA adapter's ``task_type`` (transformers loads the
base model an adapter names through peft). This module reads JSON only; it imports neither torch nor
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.model_folder import MODEL_INFO, TASKS, ModelInfo, read_json_object

# Endpoint -> the task it needs. /healthz and /v1/models work for every task.
ENDPOINT_TASKS = {
    "/v1/classify": "sequence_classification",
    "/v1/ner": "token_classification",
    "/v1/qa": "question_answering",
    "/v1/chat/completions": "causal_lm",
    "/v1/completions": "causal_lm",
}


_ARCH_SUFFIXES = (
    ("ForSequenceClassification", "sequence_classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForQuestionAnswering", "question_answering"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
)


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a model folder before loading weights."""

    path: Path
    task: str
    model_id: str
    labels: list[str] = field(default_factory=list)
    max_seq_length: Optional[int] = None
    adapter: bool = False  # a LoRA adapter folder rather than full weights
    # QA windows and span limits as the model was evaluated (rayfine.json); None = serving's defaults
    doc_stride: Optional[int] = None
    max_answer_length: Optional[int] = None
    n_best: Optional[int] = None

    def load_kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments: an adapter folder has no config.json to carry the labels."""
        if not (self.adapter and self.labels and self.task != "question_answering"):
            return {}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``rayfine.json`` (or infer from ``config.json``); raise UserError naming the folder and the fix."""
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"{model_dir}: model folder not found; pass RUN/model or a run config")
    config = read_json_object(path / "config.json")
    adapter = read_json_object(path / "adapter_config.json") if config is None else None
    if config is None and adapter is None:
        raise UserError(f"{path}: no config.json; this is not a Hugging Face model folder "
                        "(expected the model/ folder that `rayfine train` exports)")
    meta = ModelInfo.load(path) or ModelInfo()
    inferred = infer_task(config.get("architectures") or []) if config else _PEFT_TASKS.get(adapter.get("task_type"))
    task = meta.task or inferred
    if task not in TASKS:
        found = (config or {}).get("architectures") or (adapter or {}).get("task_type")
        raise UserError(f"{path}: cannot tell the model's task (found {found!r}); add {MODEL_INFO} with "
                        f"\"task\": one of {', '.join(TASKS)}")
    weights = ("adapter_model.safetensors",) if adapter else ("model.safetensors", "model.safetensors.index.json")
    if not any((path / name).exists() for name in weights):
        raise UserError(f"{path}: no {weights[0]}; rayfine serves safetensors weights only "
                        "(re-export the model, or convert it with save_pretrained(safe_serialization=True))")
    labels = list(meta.labels or _labels_from_config(config or {}))
    return ModelSpec(
        path=path,
        task=task,
        model_id=str(meta.model_id or path.name),
        labels=[str(label) for label in labels],
        max_seq_length=meta.max_seq_length,
        adapter=adapter is not None,
        doc_stride=meta.doc_stride,
        max_answer_length=meta.max_answer_length,
        n_best=meta.n_best,
    )


_PEFT_TASKS = {"SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification",
               "QUESTION_ANS": "question_answering", "CAUSAL_LM": "causal_lm"}


def infer_task(architectures: list[str]) -> Optional[str]:
    for arch in architectures:
        for suffix, task in _ARCH_SUFFIXES:
            if arch.endswith(suffix):
                return task
    return None


def _labels_from_config(config: dict) -> list[str]:
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else []

"""Reading an exported model folder: which task it does, its served id, its labels and limits.

The folder is the contract with training (``training`` and ``serving`` never import each other): a Hugging
Face folder with ``config.json``, ``model.safetensors``, tokenizer files and ``rayfine.json``, or a LoRA
adapter folder (``adapter_config.json``, ``adapter_model.safetensors``; transformers loads the base model it
names through peft)::

    {"task": "sequence_classification", "base_model": "...", "max_seq_length": 128,
     "labels": ["neg", "pos"], "rayfine_version": "0.1.0", "model_id": "ft:BASE:SUFFIX:JOBID"}

``model_id`` is optional (default: the folder's name). Without ``rayfine.json`` the task is inferred from
``config.json``'s ``architectures``. This module reads JSON only; it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cluster.errors import UserError

TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm")

# Endpoint -> the task it needs. /healthz and /v1/models work for every task.
ENDPOINT_TASKS = {
    "/v1/classify": "sequence_classification",
    "/v1/ner": "token_classification",
    "/v1/qa": "question_answering",
    "/v1/chat/completions": "causal_lm",
    "/v1/completions": "causal_lm",
}

# The chat template used when a causal LM folder brings none (tokenizer_config.json's "chat_template" or
# chat_template.jinja; rayfine's own exports always carry one). It is the same string as
# training.tasks.causal_lm.DEFAULT_CHAT_TEMPLATE (training and serving never import each other): keep the
# two identical. Each message is a role header line, its content and the EOS token; the generation prompt
# is the assistant header, so a fine-tuned model ends its answer with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_chat_template() -> str:
    """The Jinja chat template for causal LM folders without one (see ``DEFAULT_CHAT_TEMPLATE``).

    Example: ``[{"role": "user", "content": "Hi"}]`` with a generation prompt renders as
    ``"<|user|>\\nHi</s>\\n<|assistant|>\\n"`` for a tokenizer whose EOS token is ``</s>``.
    """
    return DEFAULT_CHAT_TEMPLATE


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
    config = _read_json(path / "config.json")
    adapter = _read_json(path / "adapter_config.json") if config is None else None
    if config is None and adapter is None:
        raise UserError(f"{path}: no config.json; this is not a Hugging Face model folder "
                        "(expected the model/ folder that `rayfine train` exports)")
    meta = _read_json(path / "rayfine.json") or {}
    inferred = infer_task(config.get("architectures") or []) if config else _PEFT_TASKS.get(adapter.get("task_type"))
    task = meta.get("task") or inferred
    if task not in TASKS:
        found = meta.get("task") or (config or {}).get("architectures") or (adapter or {}).get("task_type")
        raise UserError(f"{path}: cannot tell the model's task (found {found!r}); add rayfine.json with "
                        f"\"task\": one of {', '.join(TASKS)}")
    weights = ("adapter_model.safetensors",) if adapter else ("model.safetensors", "model.safetensors.index.json")
    if not any((path / name).exists() for name in weights):
        raise UserError(f"{path}: no {weights[0]}; rayfine serves safetensors weights only "
                        "(re-export the model, or convert it with save_pretrained(safe_serialization=True))")
    labels = list(meta.get("labels") or _labels_from_config(config or {}))
    return ModelSpec(
        path=path,
        task=task,
        model_id=str(meta.get("model_id") or path.name),
        labels=[str(label) for label in labels],
        max_seq_length=meta.get("max_seq_length"),
        adapter=adapter is not None,
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


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value

"""The exported model folder: the contract between training (which writes it) and serving (which reads it).

A Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files) or a LoRA adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``), plus ``rayfine.json``::

    {"task": "sequence_classification", "model_id": "ft:BASE:SUFFIX:JOBID", "base_model": "...",
     "max_seq_length": 128, "labels": ["neg", "pos"], "rayfine_version": "0.1.0"}

``ModelInfo`` is that file, typed. This module reads JSON only: it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import UserError

TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm")
Task = Literal["sequence_classification", "token_classification", "question_answering", "causal_lm"]
MODEL_INFO = "rayfine.json"

# The chat template of causal LM folders whose tokenizer brings none: training renders chat records with it
# and saves it with the exported tokenizer; serving falls back to it for folders exported elsewhere. Each
# message is a role header line, its content and the EOS token; the generation prompt is the assistant
# header, so a fine-tuned model ends its answer with EOS. Example: [{"role": "user", "content": "Hi"}] with a
# generation prompt renders as "<|user|>\nHi</s>\n<|assistant|>\n" for a tokenizer whose EOS token is </s>.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def read_json_object(path: Path) -> Optional[dict]:
    """A JSON object file of a model folder (rayfine.json, config.json, ...); None when the file is missing.
    Raises UserError naming a file that is not a JSON object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


class ModelInfo(BaseModel):
    """``rayfine.json``. Unknown keys are kept (folders written by later versions still load)."""

    model_config = ConfigDict(extra="allow")

    task: Optional[Task] = None
    model_id: Optional[str] = None  # the served id; None = the folder's name
    base_model: Optional[str] = None
    max_seq_length: Optional[int] = None
    labels: Optional[list[str]] = None
    rayfine_version: Optional[str] = None
    # How the model's outputs are read, as its evaluation read them (serving reads them the same way):
    # token_classification: each word's label is its first sub-token's (pipeline aggregation_strategy "first").
    aggregation_strategy: Optional[str] = None
    # question_answering: windows of max_seq_length tokens overlapping by doc_stride; answers of at most
    # max_answer_length tokens, from the n_best start and end candidates of each window.
    doc_stride: Optional[int] = None
    max_answer_length: Optional[int] = None
    n_best: Optional[int] = None

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / MODEL_INFO).write_text(self.model_dump_json(indent=2, exclude_none=False))

    @classmethod
    def load(cls, model_dir: Path) -> Optional["ModelInfo"]:
        """The folder's ``rayfine.json``; None when it has none. Raises UserError naming a broken one."""
        path = Path(model_dir) / MODEL_INFO
        raw = read_json_object(path)
        if raw is None:
            return None
        if isinstance(raw.get("labels"), list):
            raw["labels"] = [str(label) for label in raw["labels"]]
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            hint = f"; use one of {', '.join(TASKS)}" if where == "task" else ""
            raise UserError(f"{path}: {where}: {err['msg']} (got {err.get('input')!r}){hint}") from None

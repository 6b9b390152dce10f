"""Request and response models at the HTTP edge: OpenAI's wire format and rayfine's task endpoints.

Requests ignore unknown fields (newer OpenAI clients send parameters we do not implement, and the official
client must work unchanged); known fields are type-checked, and a wrong type is a 422 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI allows at most 4 stop sequences.
MAX_STOP_SEQUENCES = 4
# More choices per request than this multiplies work without a use we know of.
MAX_CHOICES = 8


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _non_empty_text(value: Union[str, list[str]], what: str = "input") -> Union[str, list[str]]:
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError(f"{what} must not be an empty list")
    if any(not item.strip() for item in items):
        raise ValueError(f"{what} must not be empty or blank")
    return value


# ---- task endpoints ------------------------------------------------------------------------------------

class TextInputRequest(_Request):
    """``/v1/classify`` and ``/v1/ner``: one text or a list of texts."""

    input: Union[str, list[str]]
    model: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value):
        return _non_empty_text(value)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class QAItem(_Request):
    question: str
    context: str

    @field_validator("question", "context")
    @classmethod
    def _check_text(cls, value, info):
        return _non_empty_text(value, info.field_name)


class QARequest(_Request):
    """``/v1/qa``: ``{"question", "context"}``, or ``{"input": [{"question", "context"}, ...]}``."""

    question: Optional[str] = None
    context: Optional[str] = None
    input: Optional[list[QAItem]] = Field(None, min_length=1)
    model: Optional[str] = None

    def items(self) -> list[QAItem]:
        if self.input is not None:
            return list(self.input)
        if self.question is None or self.context is None:
            raise ValueError("give question and context, or input: [{question, context}, ...]")
        return [QAItem(question=self.question, context=self.context)]


# ---- OpenAI: models, completions, chat completions ---------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayfine"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: Optional[str] = Field(None, description="must name the served model when given; None = it")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-2**63, le=2**64 - 1, description="what torch.Generator takes (64 bits)")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="newer name of max_tokens")

    def requested_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        return _non_empty_text(value, "prompt")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_tokens(self) -> Optional[int]:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "finish_reason": c["finish_reason"], "logprobs": None} for c in choices],
            "usage": usage.model_dump(), "system_fingerprint": None}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any],
               finish_reason: Optional[str] = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                         "logprobs": None} for c in choices],
            "usage": usage.model_dump()}


def completion_chunk(rid: str, model: str, index: int, text: str,
                     finish_reason: Optional[str] = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, usage: Usage) -> dict[str, Any]:
    """The last chunk of a stream when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [],
            "usage": usage.model_dump()}

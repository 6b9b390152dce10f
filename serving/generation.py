"""Causal LM generation: chat templates, prompts, and the text of a request's generated tokens. No HTTP here.

The tokens come from the model's engine (``serving.engine``: continuous batching, or one sequence at a time),
which runs in its own thread. ``Generator.stream`` turns a request's token updates into text deltas on the
replica's event loop: it cuts at stop sequences (which may span tokens), holds back what could be the start of
one and half-decoded UTF-8, ends at the deadline, and cancels the request in the engine when the client goes
away, so its slot frees at the next step. The request path owns one tokenizer for prompts and one for decoding
(``serving.tokenizers``): a fast tokenizer shared across threads raises "Already borrowed".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

from core.model_folder import DEFAULT_CHAT_TEMPLATE
from serving.engine import Engine, EnginePlan, SequentialEngine, context_length, free_memory_bytes, plan_engine
from serving.errors import ServingError, input_too_long
from serving.model_folder import ModelSpec
from serving.sampling import SamplingParams

if TYPE_CHECKING:
    from core.config import ServeConfig

logger = logging.getLogger(__name__)

__all__ = ["Finished", "Generator", "SamplingParams"]
_request_ids = itertools.count()


@dataclass
class Finished:
    """The last event of a generation."""

    reason: str  # "stop" (EOS or a stop sequence), "length" (max_tokens), "timeout" (deadline)
    completion_tokens: int


@dataclass
class Timing:
    """When a request's tokens came: for time to first token and inter-token latency."""

    submitted: float
    first: Optional[float] = None
    last: Optional[float] = None
    tokens: int = 0


class Generator:
    """A causal LM with its tokenizers, chat template and generation engine."""

    def __init__(self, spec: ModelSpec, device: str, serve: "ServeConfig", trust_remote_code: bool, weights=None):
        from transformers import AutoModelForCausalLM

        from serving.tokenizers import shared_tokenizer

        self.tokenizer = shared_tokenizer(spec.path, "loop", trust_remote_code)  # request path: prompts
        self._decoder = shared_tokenizer(spec.path, "decode", trust_remote_code)  # request path: generated text
        # ``weights``: a model already loaded (a LoRA adapter on a shared base, serving.pool)
        model = weights if weights is not None else AutoModelForCausalLM.from_pretrained(
            spec.path, use_safetensors=True, trust_remote_code=trust_remote_code)
        self.model = model.to(device).eval()
        self.chat_template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        config = self.model.config
        self.context_length = context_length(config)
        self.max_input_tokens = min(serve.max_input_tokens, self.context_length - 1)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        paged = bool(getattr(self.model, "_supports_attention_backend", False))  # transformers' attention interface
        self.plan = plan_engine(serve, config, self.context_length, self.model.dtype.itemsize,
                                free_memory_bytes(device), device, paged)
        self.engine = build_engine(self.plan, self.model, self.eos_ids, device)
        self.waiting = 0  # submitted, no token yet
        self.running = 0  # generating
        self.abandoned = 0  # requests whose client went away before the end (their slots freed at once)
        logger.info("%s: %s", spec.model_id, self.plan.describe())

    def close(self) -> None:
        """Stop the engine once the requests in it have finished (the model is being unloaded); blocks until then."""
        self.engine.close()

    # ---- request path (event loop thread) ------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself; do not add special tokens a second time.
        return self._check(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._check(self.tokenizer(prompt)["input_ids"], "prompt")

    def _check(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.max_input_tokens:
            raise input_too_long(len(ids), self.max_input_tokens, param)
        return ids

    def budget(self, prompt_len: int, requested: Optional[int], default: int) -> int:
        """New tokens to generate: the request's ``max_tokens``, else ``default`` clipped to the context."""
        room = self.context_length - prompt_len
        if requested is None:
            return max(1, min(default, room))
        if requested > room:
            raise ServingError(400, f"This model's context is {self.context_length} tokens; the prompt takes "
                                    f"{prompt_len} and max_tokens asks for {requested}. Lower max_tokens.",
                               param="max_tokens", code="context_length_exceeded")
        return requested

    # ---- generation ----------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], params: SamplingParams, deadline: float,
                     timing: Optional[Timing] = None) -> AsyncIterator[str | Finished]:
        """Yield text deltas, then one ``Finished``. Ends at ``deadline`` (monotonic); a consumer that stops
        iterating (the client went away) cancels the request in the engine."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()  # the engine puts its updates here, on this loop
        request_id = f"gen-{next(_request_ids)}"
        timing = timing or Timing(time.monotonic())
        text = _Text(self._decoder, params.stop, self.eos_ids)
        finished = ended = False  # ended: by the deadline or an engine error
        alarm = loop.call_later(max(0.0, deadline - time.monotonic()), updates.put_nowait, _DEADLINE)
        self.waiting += 1
        self.engine.submit(request_id, prompt_ids, params, updates.put_nowait)
        try:
            while True:
                update = await updates.get()
                while not updates.empty() and update is not _DEADLINE:  # fell behind: each holds all tokens
                    update = updates.get_nowait()
                if update is _DEADLINE:
                    ended = True
                    if text.pending:
                        yield text.pending
                    yield Finished("timeout", text.count)
                    return
                if update.error:
                    ended = True
                    raise ServingError(500, f"Generation failed: {update.error}", code="generation_failed")
                if timing.first is None and update.tokens:
                    timing.first = time.monotonic()
                    self.waiting -= 1
                    self.running += 1
                timing.last, timing.tokens = time.monotonic(), len(update.tokens)
                delta, reason = text.advance(update.tokens, update.done)
                if delta:
                    yield delta
                if reason is not None:
                    finished = True
                    yield Finished(reason, text.count)
                    return
        finally:
            alarm.cancel()
            if timing.first is None:
                self.waiting -= 1
            else:
                self.running -= 1
            if not finished or text.stopped_early:
                self.engine.cancel(request_id)  # client gone, deadline, or a stop sequence: free the slot
            if not finished and not ended:
                self.abandoned += 1

    def counts(self) -> dict[str, int]:
        """Requests in the engine now (``running``: generating, ``waiting``: no token yet), and how many were
        abandoned by their client so far (``/v1/replica``)."""
        return {"running": self.running, "waiting": self.waiting, "abandoned": self.abandoned}


_DEADLINE = object()


def build_engine(plan: EnginePlan, model, eos_ids: set[int], device: str) -> Engine:
    if plan.engine == "sequential":
        return SequentialEngine(model, eos_ids, device)
    from serving.batching import TransformersEngine  # imports transformers' continuous batching

    return TransformersEngine(model, eos_ids, plan)


class _Text:
    """The text of one request's tokens, released as deltas."""

    def __init__(self, decoder, stops: list[str], eos_ids: set[int]):
        self._decoder, self._stops, self._eos_ids = decoder, stops, eos_ids
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._text, self._sent = "", 0
        self.count = 0  # completion tokens: generated tokens, an EOS token not counted
        self.stopped_early = False  # a stop sequence ended it while the engine still generates

    @property
    def pending(self) -> str:
        return self._text[self._sent:]

    def advance(self, tokens: list[int], done: bool) -> tuple[str, Optional[str]]:
        """The new text to send, and the finish reason once the request is over."""
        eos = bool(tokens) and tokens[-1] in self._eos_ids
        tokens = tokens[:-1] if eos else tokens
        self.count = len(tokens)
        text = self._decoder.decode(tokens, skip_special_tokens=True)
        cut = _first_stop(text, self._stops)
        if cut is not None:
            self._text = text[:cut]
            self.stopped_early = not done
            return self._release(len(self._text)), "stop"
        self._text = text
        if eos or done:
            return self._release(len(text)), "stop" if eos else "length"
        # Hold back what could be the start of a stop sequence, and half-decoded UTF-8.
        return self._release(min(len(text) - self._holdback, len(text.rstrip("\ufffd")))), None

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent:upto], upto
        return delta



def _first_stop(text: str, stops: list[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

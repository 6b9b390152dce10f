"""Generation engines: what runs a causal LM's decoding steps for the requests of one model on one replica.

An engine takes token ids in and hands generated token ids out; text, stop sequences and the HTTP shape are
``serving.generation``'s and ``serving.completions``'s. Two engines, chosen by ``serve.engine``:

- ``transformers`` (``auto``'s choice): continuous batching with transformers' ``ContinuousBatchingManager``
  (``serving.batching``). New requests join the running batch at the next step, finished and cancelled ones
  leave it, the KV cache is paged; every request keeps its own sampling parameters and random stream.
- ``sequential``: one sequence at a time with the model's own KV cache, the way a replica generated before
  continuous batching. ``auto`` falls back to it for a model whose attention cannot run on a paged cache
  (custom code that does not use transformers' attention interface).

``plan_engine`` derives the batch size and the KV cache's size from the ``serve:`` section, the model's shape
and the memory at hand; the replica and ``rayfine validate`` report the same plan.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from core.config import ServeConfig
from core.errors import ConfigError
from serving.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

PAGE_SIZE = 64  # tokens per KV-cache page: a short prompt wastes at most one page
KV_MEMORY_FRACTION = {"cpu": 0.2, "cuda": 0.5}  # of the memory free once the weights are loaded


@dataclass(frozen=True)
class Update:
    """What an engine hands out after a step: every token generated so far for one request."""

    tokens: list[int]
    done: bool  # the engine stopped the sequence (an EOS token, the last of ``tokens``, or max_tokens)
    error: Optional[str] = None


Deliver = Callable[[Update], None]  # engines call it on the event loop the request was submitted on


class Engine(Protocol):
    name: str

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        """Queue a request (called on the replica's event loop); ``deliver`` gets its updates."""

    def cancel(self, request_id: str) -> None:
        """Drop a request: it leaves the batch at the next step, and its KV cache pages are freed."""

    def alive(self) -> bool:
        """False once the engine's thread has died; the replica's health check reports it."""

    def close(self) -> None:
        """Refuse new requests, let those in the engine finish, then stop its thread and free its cache (the model
        is being unloaded); returns once that is done."""


@dataclass(frozen=True)
class EnginePlan:
    engine: str  # "transformers" or "sequential"
    max_running: int  # sequences decoded together in one step
    kv_cache_tokens: int  # tokens the paged KV cache holds, all sequences together
    kv_bytes_per_token: int
    max_batch_tokens: int  # prompt and decode tokens in one forward pass (longer prompts prefill in chunks)
    page_size: int = PAGE_SIZE

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_tokens * self.kv_bytes_per_token

    def describe(self) -> str:
        if self.engine == "sequential":
            return "sequential (one sequence at a time)"
        return (f"continuous batching (transformers): up to {self.max_running} sequences per step, KV cache "
                f"{self.kv_cache_tokens} tokens ({self.kv_cache_bytes / 2**20:.1f} MiB), "
                f"{self.max_batch_tokens} tokens per forward pass")


def context_length(model_config: Any) -> int:
    """Tokens a causal LM attends over: its position embeddings (``n_positions`` in GPT-2's config), else 2048."""
    return int(getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
               or 2048)


def kv_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """Keys and values of one token across all layers: 2 x layers x KV heads x head size x bytes."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def plan_engine(cfg: ServeConfig, model_config: Any, context_length: int, dtype_bytes: int, free_bytes: int,
                device: str = "cpu", supports_paged: bool = True) -> EnginePlan:
    """The engine and its sizes for one model.

    Batch size: ``serve.max_running_sequences``, else ``serve.max_ongoing_requests`` (a replica never holds more
    requests than that). KV cache: ``serve.kv_cache_tokens``, else room for that many sequences of the longest
    request the server accepts (``max_input_tokens`` + ``max_new_tokens``, capped by the context), at most
    ``KV_MEMORY_FRACTION`` of ``free_bytes`` and never less than one such sequence. Requests beyond what the cache
    holds wait for a sequence to finish.
    """
    engine = cfg.engine
    if engine == "auto":
        engine = "transformers" if supports_paged else "sequential"
    elif engine == "transformers" and not supports_paged:
        raise ConfigError("serve.engine: transformers needs a model whose attention runs on a paged KV cache "
                          "(transformers' attention interface); this model's code does not; use auto or sequential")
    per_token = kv_bytes_per_token(model_config, dtype_bytes)
    longest = min(context_length, cfg.max_input_tokens + cfg.max_new_tokens)
    max_running = cfg.max_running_sequences or cfg.max_ongoing_requests
    if cfg.kv_cache_tokens is not None:
        if cfg.kv_cache_tokens < longest:
            raise ConfigError(f"serve.kv_cache_tokens: {cfg.kv_cache_tokens} cannot hold one sequence of "
                              f"{longest} tokens (max_input_tokens + max_new_tokens, at most the model's context); "
                              f"raise it, or leave it out to size it from the memory")
        tokens = cfg.kv_cache_tokens
    else:
        affordable = int(free_bytes * KV_MEMORY_FRACTION.get(device, 0.2)) // per_token
        tokens = max(longest, min(max_running * longest, affordable))
    tokens = math.ceil(tokens / PAGE_SIZE) * PAGE_SIZE
    # Tokens per forward pass: on a CPU a small budget keeps the steps short, so a wave of new prompts is
    # prefilled over a few steps while the running sequences keep decoding (time to first token and inter-token
    # latency both measured better at 256 than at 576 with 16 clients, benchmarks/serve_generation.py).
    max_batch_tokens = 2048 if device == "cuda" else max(256, 2 * max_running)
    return EnginePlan(engine, max_running, tokens, per_token, max_batch_tokens)


def free_memory_bytes(device: str) -> int:
    """Memory a KV cache may come from: free accelerator memory, or the host's available memory."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


class SequentialEngine:
    """One sequence at a time, in one thread, with the model's own (dynamic) KV cache."""

    name = "sequential"

    def __init__(self, model: Any, eos_ids: set[int], device: str):
        self.model, self.eos_ids, self.device = model, eos_ids, device
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._submitted: set[str] = set()  # queued or decoding
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        with self._lock:
            self._submitted.add(request_id)
        self._queue.put((request_id, prompt_ids, params, _on_loop(asyncio.get_running_loop(), deliver)))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._submitted:  # not yet done: the decoding loop drops it
                self._cancelled.add(request_id)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)  # after the requests already queued
        self._thread.join()

    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def _run(self) -> None:
        import torch

        while (item := self._queue.get()) is not None:
            request_id, prompt_ids, params, deliver = item
            try:
                with torch.inference_mode():
                    self._decode(request_id, prompt_ids, params, deliver)
            except Exception as exc:  # the request fails; the engine serves the next one
                logger.exception("generation failed")
                deliver(Update([], True, f"{type(exc).__name__}: {exc}"))
            with self._lock:
                self._submitted.discard(request_id)
                self._cancelled.discard(request_id)

    def _decode(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        import torch

        rng = params.generator()
        ids = torch.tensor([prompt_ids], device=self.device)
        past, tokens = None, []
        while len(tokens) < params.max_tokens:
            if self._is_cancelled(request_id):
                return
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = sample(out.logits[0, -1].float().cpu(), params.temperature, params.top_p, rng)
            tokens.append(token)
            done = token in self.eos_ids or len(tokens) >= params.max_tokens
            deliver(Update(list(tokens), done))
            if done:
                return
            ids = torch.tensor([[token]], device=self.device)



def _on_loop(loop: asyncio.AbstractEventLoop, deliver: Deliver) -> Deliver:
    """``deliver``, called from another thread: run on ``loop``."""
    def handoff(update: Update) -> None:
        try:
            loop.call_soon_threadsafe(deliver, update)
        except RuntimeError:  # the loop is closed (the replica is shutting down): nobody waits for this request
            pass

    return handoff


def plan_for_model(name_or_path: str, cfg: ServeConfig, trust_remote_code: bool = False) -> EnginePlan:
    """The plan a replica would make for this model on this machine (``rayfine validate``), from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype_bytes = getattr(dtype, "itemsize", None) or (2 if str(dtype) in ("bfloat16", "float16") else 4)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    paged = bool(getattr(model_class, "_supports_attention_backend", True))  # remote code: known once loaded
    device = "cuda" if cfg.gpus_per_replica > 0 else "cpu"
    # A GPU replica's free memory is known on the replica only: the plan shows the cache it wants (at most half).
    free = free_memory_bytes("cpu") if device == "cpu" else 2**62
    return plan_engine(cfg, config, context_length(config), dtype_bytes, free, device, paged)

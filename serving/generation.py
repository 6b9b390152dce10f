"""Causal LM generation: chat templates, sampling, stop sequences, streaming. No HTTP here.

One sequence is generated at a time per replica, in a worker thread (so the replica's event loop keeps
serving other requests and streams); more throughput comes from more replicas. The request path and the
worker each own a tokenizer: a fast tokenizer shared across threads raises "Already borrowed".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from core.model_folder import DEFAULT_CHAT_TEMPLATE
from serving.errors import ServingError, input_too_long
from serving.model_folder import ModelSpec


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


@dataclass
class Finished:
    """The last event of a generation."""

    reason: str  # "stop" (EOS or a stop sequence), "length" (max_tokens), "timeout" (deadline or cancel)
    completion_tokens: int


class Generator:
    """A causal LM with its tokenizers and chat template."""

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool,
                 weights=None):
        from transformers import AutoModelForCausalLM

        from serving.tokenizers import shared_tokenizer

        load = dict(trust_remote_code=trust_remote_code)
        self.tokenizer = shared_tokenizer(spec.path, "loop", trust_remote_code)  # request path: prompts
        self._worker_tokenizer = shared_tokenizer(spec.path, "worker", trust_remote_code)  # worker: decoding
        # ``weights``: a model already loaded (a LoRA adapter on a shared base, serving.pool)
        self.model = weights if weights is not None else AutoModelForCausalLM.from_pretrained(
            spec.path, use_safetensors=True, **load)
        self.model = self.model.to(device).eval()
        self.device = device
        self.chat_template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None)
                                  or getattr(config, "n_positions", None) or 2048)
        self.max_input_tokens = min(max_input_tokens, self.context_length - 1)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # Serialises the model: the worker thread is the only one that runs it.
        self.lock = threading.Lock()

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

    # ---- worker thread --------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, deadline: float,
                 cancelled: threading.Event) -> Iterator[str | Finished]:
        """Yield text deltas, then one ``Finished``. Stops early at ``deadline`` (monotonic) or on cancel."""
        with self.lock, torch.inference_mode():
            yield from self._decode_loop(prompt_ids, params, deadline, cancelled)

    def _decode_loop(self, prompt_ids, params, deadline, cancelled) -> Iterator[str | Finished]:
        rng = torch.Generator()
        rng.manual_seed(params.seed) if params.seed is not None else rng.seed()
        holdback = max((len(s) for s in params.stop), default=1) - 1
        ids = torch.tensor([prompt_ids], device=self.device)
        past, generated, text, sent, reason = None, [], "", 0, "length"
        for _ in range(params.max_tokens):
            if cancelled.is_set() or time.monotonic() > deadline:
                reason = "timeout"
                break
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = sample(out.logits[0, -1].float().cpu(), params.temperature, params.top_p, rng)
            if token in self.eos_ids:
                reason = "stop"
                break
            generated.append(token)
            text = self._worker_tokenizer.decode(generated, skip_special_tokens=True)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
                break
            # Hold back what could be the start of a stop sequence, and half-decoded UTF-8.
            safe = min(len(text) - holdback, len(text.rstrip("\ufffd")))
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            ids = torch.tensor([[token]], device=self.device)
        if len(text) > sent:
            yield text[sent:]
        yield Finished(reason, len(generated))


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling (the smallest set of tokens with mass >= top_p)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # In float64 (a float32 tensor would round a temperature below ~1e-45 to 0) and shifted so the largest logit
    # is 0: a temperature near 0 sends the others to -inf (probability 0), never to inf - inf = NaN, so it
    # samples like greedy instead of failing.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


def _first_stop(text: str, stops: list[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

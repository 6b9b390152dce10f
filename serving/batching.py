"""Continuous batching with transformers' ``ContinuousBatchingManager`` (checked against transformers 5.23.0).

The manager runs one background thread per model: each step it takes the waiting requests that fit the batch and
the paged KV cache, runs one forward pass over all of them (prompt tokens of new requests and one token of each
running one, packed into one sequence with a paged-attention mask), and appends the next token to each. A
cancelled request leaves at the next step and its cache pages are freed.

Per-request sampling: the manager samples with one set of parameters for the whole batch and the process-wide
random stream. ``RequestSampler`` replaces its logits processors: it draws the token of every sampling request
with that request's temperature, top_p and own ``torch.Generator`` (``serving.sampling.sample``, the function the
sequential engine uses) and leaves the manager nothing to choose but that token; greedy requests keep the
manager's argmax. So a seed gives the same text alone or in a batch.

What this relies on beyond the documented entry points (``add_request``, ``cancel_request``, ``stop``): the
``logit_processor`` attribute that the manager hands to its batch processor when it starts, the
``ContinuousBatchingLogitsProcessor`` interface, and ``output_router``: its handler table (what
``register_result_handler`` fills; written here so that a closed loop cannot fail the manager's thread, and
emptied of cancelled requests), its queue of outputs that have no handler, and ``_original_attn_impl`` (cleared so
that stopping one adapter's engine does not switch the attention of a base that others still use).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from serving.engine import Deliver, EnginePlan, Update
from serving.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 600.0  # an unloaded model's requests finish first; none runs for longer than its deadline


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """Chooses the next token of each sampling request in the batch; runs in the manager's thread."""

    supported_kwargs: dict[str, type] = {"draw": object}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._draws: list[Optional[Callable[[torch.Tensor], int]]] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        # The rows of the next forward pass's logits, in this order (the manager runs prepare and forward in turn).
        self._draws = [r.state.logit_processor_kwargs.get("draw") for r in requests_with_new_token]
        return torch.zeros(len(self._draws), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        for row, draw in enumerate(self._draws):
            if draw is not None:  # None: greedy, the manager's argmax picks the token
                token = draw(scores[row])
                scores[row].fill_(float("-inf"))
                scores[row, token] = 0.0
        return scores


def _drawer(params: SamplingParams) -> Optional[Callable[[torch.Tensor], int]]:
    if params.greedy:
        return None
    rng = params.generator()  # a CPU generator: the row is drawn on the CPU, whatever the model's device
    return lambda logits: sample(logits.cpu(), params.temperature, params.top_p, rng)


class _LoopHandle:
    """An event loop as the manager's output router uses it, except that a closed loop (the replica is shutting
    down) drops the output instead of raising in the manager's thread, which would fail every request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop

    def call_soon_threadsafe(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass


class TransformersEngine:
    """The continuous-batching engine of one model (its ``Engine`` interface: ``serving.engine``)."""

    name = "transformers"

    def __init__(self, model: Any, eos_ids: set[int], plan: EnginePlan):
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching import ContinuousBatchingManager
        from transformers.generation.logits_process import LogitsProcessorList

        generation = GenerationConfig(do_sample=False, eos_token_id=sorted(eos_ids) or -1)
        batching = ContinuousBatchingConfig(
            page_size=plan.page_size, num_blocks=plan.kv_cache_tokens // plan.page_size,
            max_batch_tokens=plan.max_batch_tokens, max_requests_per_batch=plan.max_running,
            # RequestSampler is Python that runs per step: it needs each batch prepared right before its forward
            # pass (no async batching), and a forward pass that is run, not replayed (no CUDA graphs).
            use_async_batching=False, use_cuda_graph=False)
        # Built directly, not with model.init_continuous_batching: a LoRA adapter's model is a view of a shared
        # base (serving.pool.AdapterView) whose forward activates the adapter; the base's method would bypass it.
        self.manager = ContinuousBatchingManager(model, generation, batching)
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([RequestSampler()]))
        processors.tensors_required = 1  # the sampler's argument row (unused: it keeps its rows itself)
        self.manager.logit_processor = processors
        self._live: set[str] = set()
        self.manager.start()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        def on_output(output) -> None:  # on the event loop
            if request_id not in self._live:
                return  # cancelled: an output of the step that was running then
            done = output.is_finished()
            if done:
                self._forget(request_id)
            deliver(Update(list(output.generated_tokens), done, output.error))

        self._live.add(request_id)
        router = self.manager.output_router
        with router._lock:  # what register_result_handler does, with a loop that cannot fail the manager's thread
            router.result_handlers[request_id] = (on_output, _LoopHandle(asyncio.get_running_loop()))
        accepted = self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=params.max_tokens,
                                            streaming=True, draw=_drawer(params))
        if accepted is None:
            self._forget(request_id)
            deliver(Update([], True, "the generation engine is stopping"))

    def cancel(self, request_id: str) -> None:
        if request_id in self._live:
            self._forget(request_id)
            self.manager.cancel_request(request_id)

    def _forget(self, request_id: str) -> None:
        self._live.discard(request_id)
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)
        # Outputs without a handler go to the manager's queue: only ever those of a step that was running when its
        # request was cancelled. Drop them, or they would pile up for the replica's lifetime.
        while not router.output_queue.empty():
            router.output_queue.get_nowait()

    def alive(self) -> bool:
        return self.manager.is_running()

    def close(self) -> None:
        """Refuse new requests, let the ones in the engine finish, then stop its thread (blocks until then)."""
        # Keep the attention implementation the manager switched to (eager -> paged|eager): the model is being
        # unloaded, and a LoRA base shared with other adapters' engines must keep running on a paged cache.
        self.manager._original_attn_impl = None
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=CLOSE_TIMEOUT_S)

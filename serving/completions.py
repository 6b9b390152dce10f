"""OpenAI ``/v1/chat/completions`` and ``/v1/completions`` for causal LMs, streaming as server-sent events.

A stream is ``data: {chunk}`` frames and a final ``data: [DONE]``. The ``n`` choices of a request (of each prompt
of a completions request) are generated together, in the engine's batch, and streamed as their tokens come, each
chunk with its choice's ``index``; choice ``i`` samples with seed ``seed + i``.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from core.openai_errors import error_body
from serving.errors import ServingError, check_characters, check_input_count
from serving.generation import Finished
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    usage_chunk,
)
from serving.sampling import SamplingParams

ENDPOINT_CHAT = "/v1/chat/completions"
ENDPOINT_COMPLETIONS = "/v1/completions"


def add_routes(app: FastAPI, server) -> None:
    @app.post(ENDPOINT_CHAT)
    async def chat(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_input_count(len(messages), server.cfg.max_inputs_per_request, "messages")
        check_characters("".join(m["content"] for m in messages), server.cfg.max_input_tokens, "messages")
        served = await server.served(body.model, ENDPOINT_CHAT)  # a first request pays the model's load
        deadline = time.monotonic() + server.cfg.request_timeout_s
        prompts = [served.model.encode_chat(messages)]
        return await _respond(server, served, body, prompts, deadline, chat=True)

    @app.post(ENDPOINT_COMPLETIONS)
    async def complete(body: CompletionRequest):
        texts = body.prompts()
        check_input_count(len(texts), server.cfg.max_inputs_per_request, "prompt")
        for text in texts:
            check_characters(text, server.cfg.max_input_tokens, "prompt")
        served = await server.served(body.model, ENDPOINT_COMPLETIONS)
        deadline = time.monotonic() + server.cfg.request_timeout_s
        prompts = [served.model.encode_prompt(p) for p in texts]
        return await _respond(server, served, body, prompts, deadline, chat=False)


def _params(server, served, body, prompt_len: int, choice: int) -> SamplingParams:
    requested = body.requested_tokens()
    limit = server.cfg.max_new_tokens
    if requested is not None and requested > limit:
        raise ServingError(400, f"max_tokens is {requested}; this server allows at most {limit} "
                                "(serve.max_new_tokens).", param="max_tokens", code="max_tokens_too_large")
    seed = body.seed + choice if body.seed is not None else None
    return SamplingParams(max_tokens=served.model.budget(prompt_len, requested, limit),
                          temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=seed)


def _jobs(server, served, body, prompts: list[list[int]]) -> list[tuple[int, list[int], SamplingParams]]:
    """(choice index, prompt ids, params) for every choice; validated before anything is generated."""
    return [(p * body.n + i, ids, _params(server, served, body, len(ids), i))
            for p, ids in enumerate(prompts) for i in range(body.n)]


async def _respond(server, served, body, prompts: list[list[int]], deadline: float, chat: bool):
    rid = new_id("chatcmpl" if chat else "cmpl")
    jobs = _jobs(server, served, body, prompts)
    model = served.spec.model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(server, served, rid, model, prompts, jobs, deadline, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    parts: dict[int, list[str]] = {index: [] for index, _, _ in jobs}
    finished: dict[int, Finished] = {}
    async with aclosing(_merged(server, served, jobs, deadline)) as events:
        async for index, event in events:
            if not isinstance(event, Finished):
                parts[index].append(event)
            elif event.reason == "timeout":
                raise ServingError(408, _too_long(server), code="request_timeout")
            else:
                finished[index] = event
    completion_tokens = sum(f.completion_tokens for f in finished.values())
    choices = []
    for index in sorted(parts):
        text = "".join(parts[index])
        if not chat and body.echo:
            text = body.prompts()[index // body.n] + text
        choices.append({"index": index, "text": text, "finish_reason": finished[index].reason})
    server.telemetry.record_tokens(model, ENDPOINT_CHAT if chat else ENDPOINT_COMPLETIONS, completion_tokens)
    usage = _usage(prompts, completion_tokens)
    build = chat_response if chat else completion_response
    return JSONResponse(build(rid, model, choices, usage))


async def _merged(server, served, jobs, deadline: float) -> AsyncIterator[tuple[int, Any]]:
    """``(choice index, event)`` of all choices as they come; every choice ends with its ``Finished``. Closing
    this (a client that went away, an error, a timeout) cancels the choices still generating."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for event in server.generate(served, ids, params, deadline):
                events.put_nowait((index, event))
        except Exception as exc:  # handed to the request, which answers with the error shape
            events.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(*job)) for job in jobs]
    try:
        remaining = len(jobs)
        while remaining:
            index, event = await events.get()
            if isinstance(event, Exception):
                raise event
            yield index, event
            if isinstance(event, Finished):
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()


def _too_long(server) -> str:
    return f"Generation took longer than {server.cfg.request_timeout_s}s (serve.request_timeout_s)."


def _usage(prompts: list[list[int]], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _stream(server, served, rid: str, model: str, prompts: list[list[int]], jobs, deadline: float,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    completion_tokens = 0
    events = _merged(server, served, jobs, deadline)
    try:
        if chat:
            for index, _, _ in jobs:
                yield _sse(chat_chunk(rid, model, index, {"role": "assistant", "content": ""}))
        async for index, event in events:
            if isinstance(event, Finished):
                completion_tokens += event.completion_tokens
                if event.reason == "timeout":
                    yield _sse(error_body(_too_long(server), "timeout_error", None, "request_timeout"))
                    yield "data: [DONE]\n\n"
                    return
                yield _sse(chat_chunk(rid, model, index, {}, event.reason) if chat
                           else completion_chunk(rid, model, index, "", event.reason))
            elif chat:
                yield _sse(chat_chunk(rid, model, index, {"content": event}))
            else:
                yield _sse(completion_chunk(rid, model, index, event))
        if include_usage:
            usage = _usage(prompts, completion_tokens)
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(usage_chunk(rid, model, obj, usage))
        yield "data: [DONE]\n\n"
    except ServingError as exc:  # headers are sent: report in-band, the way OpenAI streams do
        yield _sse(exc.body())
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that went away: its choices leave the engine's batch
        server.telemetry.record_tokens(model, ENDPOINT_CHAT if chat else ENDPOINT_COMPLETIONS, completion_tokens)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

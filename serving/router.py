"""The HTTP edge: FastAPI routes, auth, error shapes, access logs and metrics around the ``ModelServer``.

Only the routes of the deployed model's task are registered; the other task endpoints answer 404 with
the error shape and a message saying which task the deployment serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.openai_errors import bearer_key_ok, error_body, send_error, send_unauthorized
from core.ray_private import serve_request_id
from serving import completions
from serving.errors import (
    ServingError,
    check_characters,
    check_input_count,
    check_model,
    request_too_large,
    unknown_model,
)
from serving.model_folder import ENDPOINT_TASKS
from serving.protocol import ModelCard, ModelList, QARequest, TextInputRequest
from serving.telemetry import REQUEST_MODEL, log_access

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz"})  # answered without an API key (load balancer and k8s probes)


def build_router(server) -> FastAPI:
    """The FastAPI app of one replica; ``server`` is the ``ModelServer`` holding the model(s). A multi-model
    replica registers every task's routes and checks each request's model against the endpoint."""
    title = "several models" if server.multi else server.spec.model_id
    app = FastAPI(title=f"rayfine: {title}", docs_url=None, redoc_url=None)
    app.state.task = None if server.multi else server.spec.task
    _add_error_handlers(app)
    _add_common_routes(app, server)
    tasks = set(ENDPOINT_TASKS.values()) if server.multi else {server.spec.task}
    if "causal_lm" in tasks:
        completions.add_routes(app, server)
    if "sequence_classification" in tasks:
        _add_text_route(app, server, "/v1/classify")
    if "token_classification" in tasks:
        _add_text_route(app, server, "/v1/ner")
    if "question_answering" in tasks:
        _add_qa_route(app, server)
    app.add_middleware(RequestMiddleware, server=server)
    return app


async def within_timeout(server, awaitable):
    try:
        if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per request, unlike wait_for
            async with asyncio.timeout(server.cfg.request_timeout_s):
                return await awaitable
        return await asyncio.wait_for(awaitable, server.cfg.request_timeout_s)
    except asyncio.TimeoutError:
        raise ServingError(408, f"The request took longer than {server.cfg.request_timeout_s}s "
                                "(serve.request_timeout_s).", code="request_timeout") from None


def _add_common_routes(app: FastAPI, server) -> None:
    created = int(time.time())

    def cards() -> dict[str, ModelCard]:
        if not server.multi:
            return {server.spec.model_id: ModelCard(id=server.spec.model_id, created=created)}
        return {mid: ModelCard(id=mid, created=e.created or created, owned_by=e.owned_by)
                for mid, e in sorted(server.catalog.entries().items())}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        if server.multi:
            return {"status": "ok", "models": len(server.catalog.entries())}
        return {"status": "ok", "model": server.spec.model_id, "task": server.spec.task}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=list(cards().values())).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if not server.multi:
            check_model(model_id, server.spec.model_id)
        card = cards().get(model_id)
        if card is None:
            raise unknown_model(model_id)
        return card.model_dump()

    @app.get("/v1/replica")
    async def replica() -> dict[str, Any]:
        """What this replica holds (loaded models, shared LoRA bases, loads, evictions, memory) and, for each
        loaded causal LM, its requests running and waiting in the engine and those abandoned by their client."""
        return server.replica_status()


async def tokenized(server, encode) -> list:
    """Run ``encode()`` (a request's tokenizing) on the replica's tokenizing thread, off the event loop (one thread:
    a fast tokenizer must not be used by two threads at once), so that a long request never holds /healthz."""
    return await asyncio.get_running_loop().run_in_executor(server.tokenizing, encode)


def _add_text_route(app: FastAPI, server, path: str) -> None:
    @app.post(path)
    async def predict(body: TextInputRequest) -> JSONResponse:
        texts = body.texts()
        check_input_count(len(texts), server.cfg.max_inputs_per_request)
        for text in texts:
            check_characters(text, server.cfg.max_input_tokens)
        served = await server.served(body.model, path)  # a first request pays the model's load
        encoded = await tokenized(server, lambda: [served.model.encode(text) for text in texts])
        return _data_response(served, *await within_timeout(server, server.predict(served, encoded)))


def _add_qa_route(app: FastAPI, server) -> None:
    @app.post("/v1/qa")
    async def answer(body: QARequest) -> JSONResponse:
        try:
            items = body.items()
        except ValueError as exc:
            raise ServingError(422, str(exc), param="question", code="invalid_value") from None
        check_input_count(len(items), server.cfg.max_inputs_per_request)
        for item in items:
            check_characters(item.question + item.context, server.cfg.max_input_tokens, "context")
        served = await server.served(body.model, "/v1/qa")
        encoded = await tokenized(server, lambda: [served.model.encode(i.question, i.context) for i in items])
        return _data_response(served, *await within_timeout(server, server.predict(served, encoded)))


def _data_response(served, results: list, batch) -> JSONResponse:
    # X-Batch-Size: the largest model batch this request's inputs ran in; Server-Timing: that batch's time in
    # the model (observability: the access log records both).
    return JSONResponse({"object": "list", "model": served.spec.model_id, "data": results},
                        headers={"X-Batch-Size": str(batch.size),
                                 "Server-Timing": f"model;dur={batch.model_ms:.2f}"})


# ---- errors ----------------------------------------------------------------------------------------------

def error_response(request: Request, status: int, body: dict[str, Any]) -> JSONResponse:
    request.scope["rayfine.error_code"] = body["error"].get("code")
    return JSONResponse(body, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError):
        return error_response(request, exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status, body = validation_error(exc.errors())
        return error_response(request, status, body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = _app_path(request.scope)
        if exc.status_code == 404 and path in ENDPOINT_TASKS:
            server_task = request.app.state.task
            message = (f"{path} needs a {ENDPOINT_TASKS[path]} model; this deployment serves a "
                       f"{server_task} model.")
            return error_response(request, 404, error_body(message, code="unsupported_endpoint"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request, exc.status_code, error_body(str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, error_body(
            f"Internal error ({type(exc).__name__}); see the replica log.", type="server_error",
            code="internal_error"))


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """400 for a body that is not JSON (or missing), 422 naming the fields for JSON of the wrong shape."""
    for e in errors:
        if e["type"] == "json_invalid" or (tuple(e["loc"]) == ("body",) and isinstance(e.get("input"),
                                                                                      (bytes, str))):
            return 400, error_body("The request body is not valid JSON.", code="invalid_json")
        if e["type"] == "missing" and tuple(e["loc"]) == ("body",):
            return 400, error_body("The request needs a JSON body.", code="missing_body")
    by_param: dict[str, list[str]] = {}
    for e in errors:
        param = _param(e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if message not in by_param.setdefault(param, []):
            by_param[param].append(message)
    message = "; ".join(f"{param}: {' or '.join(msgs)}" for param, msgs in by_param.items())
    return 422, error_body(message, param=next(iter(by_param)), code="invalid_value")


def _param(loc) -> str:
    """``("body", "input", "list[str]", 0)`` -> ``input.0``: field names and indexes, not union members."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    return ".".join(parts) or "body"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "function-after"})


def _app_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


# ---- auth, access log, metrics -----------------------------------------------------------------------------

class RequestMiddleware:
    """Pure ASGI (no response buffering, streams pass through): auth, in-flight count, log and metrics."""

    def __init__(self, app, server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, start = self.server, time.perf_counter()
        path = _app_path(scope)
        headers = dict(scope.get("headers") or [])
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # Every POST body here is JSON; read it as JSON whatever the client declared (`curl -d` says
            # form-urlencoded), so a valid body is accepted and a malformed one is a clear 400.
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        seen: dict[str, Any] = {"status": 500}

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                response_headers = dict(message.get("headers") or [])
                seen["batch"] = response_headers.get(b"x-batch-size")
                seen["timing"] = response_headers.get(b"server-timing")
            await send(message)

        note = {"model": None if server.multi else server.spec.model_id}
        REQUEST_MODEL.set(note)
        server.in_flight += 1
        server.telemetry.set_in_flight(server.in_flight)
        try:
            if server.api_keys and path not in OPEN_PATHS and not bearer_key_ok(headers, server.api_keys):
                scope["rayfine.error_code"] = "invalid_api_key"
                await send_unauthorized(send_and_watch)
            elif scope["method"] == "POST":
                body = await read_capped(receive, headers, server.cfg.max_request_bytes)
                if body is None:
                    scope["rayfine.error_code"] = "request_too_large"
                    await send_error(send_and_watch, 413, request_too_large(server.cfg.max_request_bytes),
                                     [(b"connection", b"close")])
                else:
                    await self.app(scope, replay(body, receive), send_and_watch)
            else:
                await self.app(scope, receive, send_and_watch)
        finally:
            server.in_flight -= 1
            server.telemetry.set_in_flight(server.in_flight)
            latency_ms = (time.perf_counter() - start) * 1000
            code = scope.get("rayfine.error_code")
            server.telemetry.record_request(note["model"], path, seen["status"], latency_ms, code)
            log_access(server.access_log, request_id=_request_id(headers),
                       method=scope["method"], path=path, status=seen["status"],
                       latency_ms=round(latency_ms, 2), model=note["model"],
                       batch_size=int(seen["batch"]) if seen.get("batch") else None,
                       model_ms=_model_ms(seen.get("timing")), error=code)


# A body over serve.max_request_bytes is read on and thrown away up to this many bytes before the 413 goes out:
# a client still sending when the answer comes sees a broken connection instead of the 413. Past this, the
# connection is answered and closed at once.
DRAIN_MAX_BYTES = 64 * 2**20


async def read_capped(receive, headers: dict[bytes, bytes], limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` bytes: never more than ``limit`` bytes of it
    are held in memory (the rest is read and dropped, up to DRAIN_MAX_BYTES, so the client gets the 413)."""
    try:
        declared = int(headers.get(b"content-length", b"0"))
    except ValueError:
        declared = 0
    chunks, size = [], 0
    too_large = declared > limit
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return None if too_large else b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_large, chunks = True, []
        elif not too_large:
            chunks.append(chunk)
        if not message.get("more_body") or size > DRAIN_MAX_BYTES:
            return None if too_large else b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI ``receive`` that hands over ``body`` first, then the original messages (a disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def _request_id(headers: dict[bytes, bytes]) -> str | None:
    """The id Serve's proxy gave the request (also its ``X-Request-ID`` response header)."""
    if b"x-request-id" in headers:
        return headers[b"x-request-id"].decode("latin-1")
    try:  # no proxy in front (Serve's direct ingress): Serve's request context has it
        return serve_request_id()
    except Exception:  # noqa: BLE001 - the log line goes out without an id rather than not at all
        return None


def _model_ms(server_timing: bytes | None) -> float | None:
    if not server_timing or b"dur=" not in server_timing:
        return None
    return float(server_timing.split(b"dur=")[1].split(b",")[0])

"""One error shape for every failure a client can see: OpenAI's ``{"error": {message, type, param, code}}``.

Errors raised inside the app are ``ServingError`` and become JSON responses in the router. A few errors are
produced by Ray Serve itself before a request reaches the app (backpressure from ``max_queued_requests``:
503; Serve's ``request_timeout_s``: 408): by its Python HTTP proxy, or with HAProxy (``serve.proxy``) by the
replica's own HTTP server. Serve writes those as plain text, so ``ErrorShapeMiddleware`` (installed in
either server from the same env var) rewrites them into the same JSON shape.
"""

from __future__ import annotations

from typing import Any, Optional

from core.openai_errors import error_body, error_type, send_error

# Serve's HTTP servers import this (env var core.ray_private.PROXY_CALLBACK_ENV) to shape their own errors.
PROXY_CALLBACK = "serving.errors:proxy_middlewares"

class ServingError(Exception):
    """A request that cannot be answered, with the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def __reduce__(self):  # keep the fields when Ray pickles the exception between processes
        return (_rebuild, (self.status, self.message, self.param, self.code, self.type))


def _rebuild(status, message, param, code, type_):
    return ServingError(status, message, param=param, code=code, type=type_)


def model_not_found(requested: str, served: str) -> ServingError:
    return ServingError(404, f"The model '{requested}' does not exist; this server serves '{served}'.",
                        param="model", code="model_not_found")


def unknown_model(requested: str) -> ServingError:
    """A model a multi-model app does not serve (OpenAI's wording: it does not say whether the model exists)."""
    return ServingError(404, f"The model '{requested}' does not exist or you do not have access to it.",
                        param="model", code="model_not_found")


def check_model(requested: Optional[str], served: str) -> None:
    """A request's ``model`` must name the served model (leaving it out is fine: one model per app)."""
    if requested is not None and requested != served:
        raise model_not_found(requested, served)


def input_too_long(n_tokens: int, limit: int, param: str = "input") -> ServingError:
    return ServingError(413, f"The input is {n_tokens} tokens long; the limit is {limit} tokens "
                             "(the smaller of serve.max_input_tokens and the model's context length).",
                        param=param, code="input_too_long")


# A token covers at most this many characters in any tokenizer rayfine serves (a long word, a run of spaces):
# a text longer than max_input_tokens x this is too long whatever it tokenizes to, and is refused unread.
MAX_CHARS_PER_TOKEN = 64


def check_characters(text: str, limit_tokens: int, param: str = "input") -> None:
    """413 for a text that cannot fit ``limit_tokens`` tokens, by its length alone (before any tokenization)."""
    if len(text) > limit_tokens * MAX_CHARS_PER_TOKEN:
        raise ServingError(413, f"The {param} is {len(text):,} characters long; more than "
                                f"{limit_tokens * MAX_CHARS_PER_TOKEN:,} cannot fit serve.max_input_tokens "
                                f"({limit_tokens}) tokens.", param=param, code="input_too_long")


def check_input_count(n: int, limit: int, param: str = "input") -> None:
    if n > limit:
        raise ServingError(400, f"The request has {n:,} inputs; the limit is {limit:,} "
                                "(serve.max_inputs_per_request): send them in several requests.",
                           param=param, code="too_many_inputs")


def request_too_large(limit: int) -> dict:
    return error_body(f"The request body is larger than {limit:,} bytes (serve.max_request_bytes).",
                      "invalid_request_error", None, "request_too_large")


# Error statuses Serve's proxy produces itself (no route, timeout, backpressure, a replica that died
# mid-request), with the ``code`` we give them.
_PROXY_CODES = {404: "not_found", 408: "request_timeout", 429: "too_many_requests", 500: "internal_error",
                502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}


class ErrorShapeMiddleware:
    """ASGI middleware for Serve's HTTP servers (the Python proxy's, and with HAProxy each replica's): rewrite
    Serve's plain-text errors (404, 408, 503, ...) as JSON.

    Responses from the app are JSON already and pass through untouched (only the first message of each
    response is inspected). Serve installs it from the env var ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
    serving.errors:proxy_middlewares`` (``http_options.middlewares`` was removed from Serve); see
    ``cluster.ray_start.prepare_ray_env``. On KubeRay, set it in the Ray containers' env.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def send_shaped(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"")
                if message["status"] in _PROXY_CODES and not ctype.startswith(b"application/json"):
                    held["start"] = message
                    held["body"] = b""
                    return
            elif "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                return await _send_json(send, held["start"], held["body"])
            await send(message)

        await self.app(scope, receive, send_shaped)


async def _send_json(send, start: dict, text: bytes) -> None:
    status = start["status"]
    message = text.decode("utf-8", "replace").strip() or "The service is unavailable; retry later."
    code = _PROXY_CODES[status]
    if "backpressure" in message:  # Serve's wording for a full max_queued_requests queue
        code = "server_overloaded"
        message = f"The server is at capacity; retry later. ({message})"
    kept = [(k, v) for k, v in start.get("headers") or [] if k not in (b"content-type", b"content-length")]
    await send_error(send, status, error_body(message, error_type(status), None, code), kept)


def proxy_middlewares() -> list:
    """Callback for ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (clusters whose Serve we do not start)."""
    from starlette.middleware import Middleware

    return [Middleware(ErrorShapeMiddleware)]

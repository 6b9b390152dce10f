"""OpenAI's error shape and bearer API keys: the same for the Serve app and the fine-tuning jobs API.

Every failure a client sees is ``{"error": {"message", "type", "param", "code"}}``; the official ``openai``
package turns these into its typed exceptions (``BadRequestError``, ``AuthenticationError``, ...).
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any, Optional

# The OpenAI error ``type`` of each status either server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
INVALID_KEY_MESSAGE = "Missing or invalid API key: send 'Authorization: Bearer KEY'."


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error")


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def read_api_keys(env_var: str) -> frozenset[str]:
    """The comma-separated keys in ``env_var``; empty = no authentication."""
    raw = os.environ.get(env_var, "")
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def bearer_key_ok(headers: dict[bytes, bytes], keys: frozenset[str]) -> bool:
    """Whether an ASGI request's ``Authorization: Bearer KEY`` names one of ``keys``."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    # compare_digest: no timing hints about how much of a key matched. On bytes: it refuses str with non-ASCII
    # characters, and a header may carry any byte (a wrong key, never a server error).
    return scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), key.encode()) for key in keys)


async def send_error(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer an ASGI request with ``status`` and ``body`` (an ``error_body``) as JSON, plus ``headers``."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def send_unauthorized(send) -> None:
    """Answer an ASGI request with 401 in the error shape (and ``WWW-Authenticate: Bearer``)."""
    await send_error(send, 401, error_body(INVALID_KEY_MESSAGE, "authentication_error", None, "invalid_api_key"),
                     [(b"www-authenticate", b"Bearer")])

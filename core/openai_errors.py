"""OpenAI's error shape and bearer API keys: the same for the Serve app and the fine-tuning jobs API.

Every failure a client sees is ``{"error": {"message", "type", "param", "code"}}``; the official ``openai``
package turns these into its typed exceptions (``BadRequestError``, ``AuthenticationError``, ...).
"""

from __future__ import annotations

import hashlib
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


DIGESTS_SUFFIX = "_SHA256"  # ``{api_keys_env}_SHA256``: the keys' SHA-256 digests, comma-separated


def read_api_keys(env_var: str) -> frozenset[str]:
    """The comma-separated keys in ``env_var``; empty = no authentication."""
    raw = os.environ.get(env_var, "")
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def key_digest(key: str | bytes) -> str:
    """A key's SHA-256, hex: what a server keeps and compares, so a key never has to travel or be stored in
    plain text (the Serve replicas get digests, which Ray's dashboard may show)."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def read_api_key_digests(env_var: str) -> frozenset[str]:
    """The digests of the keys in ``env_var`` and those listed in ``{env_var}_SHA256``; empty = no
    authentication."""
    raw = os.environ.get(env_var + DIGESTS_SUFFIX, "")
    listed = {d.strip().lower() for d in raw.split(",") if d.strip()}
    return frozenset(listed | {key_digest(key) for key in read_api_keys(env_var)})


def bearer_token(headers: dict[bytes, bytes]) -> bytes | None:
    """The KEY of an ASGI request's ``Authorization: Bearer KEY`` (any bytes), None without one."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def bearer_key_ok(headers: dict[bytes, bytes], digests: frozenset[str]) -> bool:
    """Whether an ASGI request's ``Authorization: Bearer KEY`` is a key whose ``key_digest`` is in ``digests``."""
    token = bearer_token(headers)
    if token is None:
        return False
    # compare_digest: no timing hints about how much matched. On the token's bytes: a header may carry any byte
    # (a wrong key, never a server error).
    presented = key_digest(token).encode()
    return any(hmac.compare_digest(presented, digest.encode()) for digest in digests)


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

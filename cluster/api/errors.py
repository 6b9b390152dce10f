"""OpenAI's error shape for every failure a client of ``rayfine api`` can see.

``{"error": {"message", "type", "param", "code"}}``; the official ``openai`` package turns these into its
typed exceptions (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...). The shape itself is
``core.openai_errors``, shared with the Serve app.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.openai_errors import error_body, error_type


class APIError(Exception):
    """A request that cannot be answered: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, error_type(self.status), self.param, self.code)


def not_found(kind: str, object_id: str, param: Optional[str] = None) -> APIError:
    return APIError(404, f"No such {kind}: '{object_id}'.", param=param, code="not_found")


def model_not_found(model_id: str) -> APIError:
    """An inference model that does not answer here: unknown, deleted, or its job has not succeeded."""
    return APIError(404, f"The model '{model_id}' does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def file_too_large(limit_bytes: int) -> APIError:
    size = f"{limit_bytes / 2**20:g} MB" if limit_bytes >= 2**20 else f"{limit_bytes:,} bytes"
    return APIError(413, f"The file is larger than this server's upload limit of {size} (rayfine api "
                         "--max-upload-mb).", param="file", code="file_too_large")


def too_large(limit_bytes: int) -> JSONResponse:
    return JSONResponse(file_too_large(limit_bytes).body(), status_code=413)


def install_error_handlers(app: FastAPI) -> None:
    """APIError, request validation (400, naming the parameter) and unknown routes, all in one shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        by_param: dict[str, list[str]] = {}
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
            # Union members (int | "auto") add their type name to the location; the parameter is what matters.
            loc = [p for p in loc if p not in ("int", "float", "str")
                   and not p.startswith(("literal[", "function-", "constrained"))]
            by_param.setdefault(".".join(loc), []).append(str(err.get("msg")))
        problems = []
        for where, msgs in by_param.items():
            # "auto" or a number: say what was wrong with the number, not that it is not "auto"
            msgs = [m for m in msgs if not m.startswith("Input should be 'auto'")] or msgs
            text = "; ".join(dict.fromkeys(msgs))
            problems.append(f"{where}: {text}" if where else text)
        param = next(iter(by_param), "") or None
        message = "Invalid request: " + "; ".join(problems)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = "No such route." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(message, error_type(exc.status_code), None, code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger(__name__).exception("unhandled error")
        return JSONResponse(error_body(f"Internal server error ({type(exc).__name__}).", "server_error"),
                            status_code=500)

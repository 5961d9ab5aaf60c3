"""The OpenAI error envelope, the engine's errors mapped
to it by type, and the app's exception handlers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mtpserve.engine.async_engine import StreamError
from mtpserve.engine.errors import RequestError

UNSUPPORTED = "unsupported_field"
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class APIError(Exception):
    """An answer in the error envelope, raised from anywhere in a route."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error envelope."""
    kind = ERROR_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def unsupported(field: str) -> APIError:
    """The one answer for every field this server does not support, declared or unknown."""
    return APIError(400, f"{field!r} is not supported by this server", field, UNSUPPORTED)


def request_error(exc: RequestError, prompt_field: str) -> APIError:
    """An invalid request is a 400. The engine names a prompt too long for the context ``messages``;
    a route whose prompt field has another name (``prompt`` for /v1/completions) passes it as
    ``prompt_field``."""
    param = exc.param
    if param == "messages":
        param = prompt_field
    return APIError(400, str(exc), param, exc.code)


def validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """The message and ``param`` of the first error pydantic found in a request."""
    errors = exc.errors()
    err = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"{param!r} is not supported by this server", param
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and "json" not in content_type:
        message = ("the request body must be JSON sent as Content-Type: application/json, "
                   f"got {content_type!r}")
        return message, None
    return f"{param or 'body'}: {err.get('msg')}", param


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def stream_failed(_: Request, exc: StreamError) -> JSONResponse:
    """A request that ended in an error (or could not start: the engine is dead);
    its type carries the status."""
    return error_response(exc.status, str(exc), code=exc.code)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Validation errors are 400s in the envelope, not FastAPI's 422."""
    message, param = validation_message(exc, request.headers.get("content-type", ""))
    code = None
    errors = exc.errors()
    if errors and errors[0].get("type") == "extra_forbidden":
        code = UNSUPPORTED
    return error_response(400, message, param, code)


async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors: unknown paths,
    wrong methods (their Allow header kept), bodies too large."""
    message = str(exc.detail)
    if exc.status_code == 404:
        message = "not found"
    code = None
    if exc.status_code == 413:
        code = "request_too_large"
    return error_response(exc.status_code, message, code=code, headers=exc.headers)


async def crashed(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StreamError, stream_failed)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crashed)

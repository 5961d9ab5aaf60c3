"""A pure ASGI middleware for request size: 431 when the headers are larger than a byte limit, 413 when the body
is (checked on Content-Length before the app runs, and again while the body is read, for chunked uploads).
Both answers carry the OpenAI error envelope."""

from __future__ import annotations

from mtpserve.server.responses import error_response
from starlette.exceptions import HTTPException

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 16 << 10


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes"


class SizeLimits:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.app = app
        self.limit = max_body_bytes
        self.header_limit = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if sum(len(k) + len(v) + 4 for k, v in headers) > self.header_limit:  # 4: ": " and CRLF per line
            message = f"the request headers are larger than the server's limit of {self.header_limit} bytes"
            return await self._reject(431, message, "headers_too_large", scope, receive, send)
        length = dict(headers).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.limit:
                return await self._reject(413, too_large_message(self.limit), "request_too_large", scope, receive,
                                          send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside body parsing: the app's HTTPException handler answers
                    raise HTTPException(413, too_large_message(self.limit))
            return message

        return await self.app(scope, limited_receive, send)

    @staticmethod
    async def _reject(status: int, message: str, code: str, scope, receive, send) -> None:
        response = error_response(status, message, code=code, headers={"connection": "close"})
        await response(scope, receive, send)

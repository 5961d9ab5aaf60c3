"""A pure ASGI middleware that answers 413 (OpenAI error envelope) for request bodies over a byte limit:
checked on Content-Length before the app runs, and again while the body is read (chunked uploads)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

DEFAULT_MAX_BODY_BYTES = 1 << 20


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes"


class BodyLimit:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.limit:
                return await self._reject(send)
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

    async def _reject(self, send) -> None:
        body = json.dumps({"error": {"message": too_large_message(self.limit), "type": "invalid_request_error",
                                     "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

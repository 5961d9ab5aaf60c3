"""A pure ASGI middleware for request size: 431 when the headers are larger than a byte limit, 413
when the body is (checked on Content-Length before the app runs, and again while the body is read,
for chunked uploads). Both answers carry the OpenAI error envelope, and every answer waits until the
body has been read."""

from __future__ import annotations

from starlette.exceptions import HTTPException

from mtpserve.server.errors import error_response

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 16 << 10
# the most of an unread body read and dropped before an answer; past it the answer may be lost
DRAIN_BYTES = 64 << 20


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes"


class SizeLimits:
    """Every answer, early rejections included, is sent only once the request body has been read (up
    to ``DRAIN_BYTES``): a server that answers and closes while the client is still sending makes
    the client's connection reset, and the client sees a read error instead of the answer."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.app = app
        self.limit = max_body_bytes
        self.header_limit = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = BodyReader(receive, self.limit)
        send = body.sending_after_drain(send)
        headers = scope.get("headers") or []
        header_bytes = sum(len(k) + len(v) + 4 for k, v in headers)  # 4: ": " and CRLF per line
        if header_bytes > self.header_limit:
            message = (f"the request headers are larger than the server's limit of "
                       f"{self.header_limit} bytes")
            return await self._reject(431, message, "headers_too_large", scope, receive, send)
        length = dict(headers).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.limit:
                message = too_large_message(self.limit)
                return await self._reject(413, message, "request_too_large", scope, receive, send)
        return await self.app(scope, body.receive, send)

    @staticmethod
    async def _reject(status: int, message: str, code: str, scope, receive, send) -> None:
        response = error_response(status, message, code=code, headers={"connection": "close"})
        await response(scope, receive, send)


class BodyReader:
    """Counts the request body as the app reads it (413 past ``limit``), and reads what is left of
    it before the response starts."""

    def __init__(self, receive, limit: int):
        self.raw_receive = receive
        self.limit = limit
        self.seen = 0
        self.done = False

    async def _next(self):
        message = await self.raw_receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:  # the client went away: nothing left to read
            self.done = True
        return message

    async def receive(self):
        if self.done:  # after the body only a disconnect can come: leave that wait to the app
            return await self.raw_receive()
        message = await self._next()
        if self.seen > self.limit:
            # raised inside body parsing: the app's HTTPException handler answers
            raise HTTPException(413, too_large_message(self.limit))
        return message

    async def drain(self) -> None:
        start = self.seen
        while not self.done and self.seen - start <= DRAIN_BYTES:
            await self._next()

    def sending_after_drain(self, send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                await self.drain()
            await send(message)
        return wrapped

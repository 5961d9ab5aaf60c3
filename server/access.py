"""Every HTTP request (pure ASGI, outermost): its ``X-Request-Id`` (the client's, or a new one)
echoed on the answer and kept in ``request.state.request_id``, one INFO log line when it ends, and
the request counter by route and status, so refused requests (401, 413, 429...) show in
Prometheus."""

from __future__ import annotations

import logging
import re
import time
import uuid

logger = logging.getLogger("mtpserve.server.access")

HEADER = b"x-request-id"
# a client's id is echoed in a header and logged: printable ASCII, bounded
VALID_ID = re.compile(r"[!-~]{1,128}")


def request_id_of(headers) -> str:
    for name, value in headers:
        if name == HEADER:
            text = value.decode("latin-1")
            if VALID_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class AccessLog:
    def __init__(self, app, metrics, paths):
        """``paths``: the app's route paths; others are counted as route "other" (so a scan of
        random paths cannot grow the metric without bound)."""
        self.app = app
        self.metrics = metrics
        self.paths = frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_of(scope.get("headers") or [])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets if the app raises before answering
        start = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((HEADER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope["path"]
            route = path if path in self.paths else "other"
            self.metrics.on_http(route, status)
            ms = (time.perf_counter() - start) * 1000
            logger.info("%s %s %s %d %.1f ms", request_id, scope["method"], path, status, ms)

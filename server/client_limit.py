"""Per-client concurrency limit (pure ASGI): at most ``limit`` generation requests in flight per
client address, a 429 in the OpenAI error envelope beyond. A request counts until its response has
been sent in full (a stream until its last chunk) or its client has gone."""

from __future__ import annotations

from collections import Counter

from mtpserve.server.errors import error_response

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class ClientLimit:
    def __init__(self, app, limit: int, paths=GENERATION_PATHS):
        self.app = app
        self.limit = limit
        self.paths = frozenset(paths)
        self.active: Counter[str] = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        if self.active[client] >= self.limit:
            message = f"too many concurrent requests from this client (limit {self.limit})"
            response = error_response(429, message, code="too_many_concurrent_requests")
            return await response(scope, receive, send)
        self.active[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[client] -= 1
            if self.active[client] <= 0:
                del self.active[client]

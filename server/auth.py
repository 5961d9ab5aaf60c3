"""API key check (pure ASGI): every route needs ``Authorization: Bearer KEY`` except the public
paths (/health, and /metrics when made public). The comparison is constant-time over fixed-length
digests, so neither the key's content nor its length shows in the answer time."""

from __future__ import annotations

import hashlib
import hmac

from mtpserve.server.errors import error_response


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyAuth:
    def __init__(self, app, api_key: str, public_paths=("/health",)):
        self.app = app
        self.expected = _digest(f"Bearer {api_key}".encode())
        self.public = frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(_digest(given), self.expected):
            return await self.app(scope, receive, send)
        response = error_response(401, "missing or invalid API key", code="invalid_api_key",
                                  headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)

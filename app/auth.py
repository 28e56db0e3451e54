"""API keys, checked before anything else touches a request: an unauthenticated client gets its 401 before its body
is read or parsed, so it cannot make the server do work. Every path needs the key except the probes and the API
description (and /metrics when the server opens it)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def key_matches(header: str | None, expected: list[str]) -> bool:
    """Bearer-token check in constant time (the comparison does not leak how much of a key matched); every key is
    compared, so the time does not say which one matched either."""
    scheme, _, token = (header or "").partition(" ")
    supplied = (token.strip() if scheme.lower() == "bearer" else "").encode()
    matched = False
    for key in expected:
        matched |= hmac.compare_digest(supplied, key.encode())
    return matched


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, keys: list[str], metrics_open: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
        if not key_matches(authorization.decode("latin-1"), self.keys):
            await APIError.invalid_api_key().to_response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

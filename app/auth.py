"""API keys, checked before anything else touches a request: an unauthenticated client gets its 401 before its body
is read or parsed, so it cannot make the server do work. Every path needs the key except the probes and the API
description (and /metrics when the server opens it). The key comes as `Authorization: Bearer KEY` (OpenAI's clients)
or `x-api-key: KEY` (Anthropic's), on any path.

Admin paths (/admin/...) take the admin key when one is set, else the API keys; with no key at all they answer only
loopback clients (403 for others), so a server started without a key on 0.0.0.0 cannot be reloaded from afar."""

from __future__ import annotations

import hmac
import ipaddress
import socket

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/admin"


def key_matches(header: str | None, expected: list[str], api_key: str | None = None) -> bool:
    """Bearer-token (or x-api-key) check in constant time (the comparison does not leak how much of a key matched);
    every key is compared with both, so the time does not say which one matched either. An empty value matches
    nothing."""
    scheme, _, token = (header or "").partition(" ")
    supplied = [(token.strip() if scheme.lower() == "bearer" else "").encode(), (api_key or "").strip().encode()]
    matched = False
    for key in expected:
        for value in supplied:
            matched |= hmac.compare_digest(value, key.encode()) and bool(value)
    return matched


def is_loopback(host: str | None) -> bool:
    """An address of this machine's loopback interface (127.0.0.0/8, ::1, ::ffff:127.x); a name or None is not."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def binds_loopback_only(host: str) -> bool:
    """Whether a listener on `host` is reachable from this machine alone (a name counts if all it resolves to is)."""
    if host == "localhost" or is_loopback(host):
        return True
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(resolved) and all(is_loopback(str(address)) for address in resolved)


def admin_loopback_only() -> APIError:
    message = (
        "The admin endpoints answer only clients on this machine while the server has no key. Start it with "
        "--admin-key (or --api-key), or TOKENMILL_ADMIN_KEY, and send 'Authorization: Bearer KEY'."
    )
    return APIError(403, message, type="permission_error", code="admin_loopback_only")


class ApiKeyGuard:
    def __init__(
        self, app: ASGIApp, keys: list[str], metrics_open: bool = False, admin_keys: list[str] | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.admin_keys = admin_keys or keys
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        keys = self.admin_keys if admin else self.keys
        if not keys:
            client = scope.get("client")
            if admin and not is_loopback(client[0] if client else None):
                await admin_loopback_only().to_response(scope["path"])(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        authorization = next((v for k, v in headers if k == b"authorization"), b"")
        api_key = next((v for k, v in headers if k == b"x-api-key"), b"")
        if not key_matches(authorization.decode("latin-1"), keys, api_key.decode("latin-1")):
            await APIError.invalid_api_key().to_response(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

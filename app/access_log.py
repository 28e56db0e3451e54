"""Credentials never reach the log: a key a client puts in the query string (`?api_key=...`, which the server does
not accept, so the client gets its 401) would otherwise be written to the access log with the rest of the URL."""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# A query parameter whose name (lower-cased, '-' as '_') contains one of these carries a credential.
SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "auth", "signature", "credential", "session")
SECRET_NAMES = frozenset({"sig", "code", "jwt"})


def is_secret(name: str) -> bool:
    name = unquote_plus(name).lower().replace("-", "_")
    return name in SECRET_NAMES or any(word in name for word in SECRET_WORDS)


def redact_query(path: str) -> str:
    """`path` with the value of every credential-like query parameter replaced by REDACTED; the rest as sent."""
    base, mark, query = path.partition("?")
    if not mark:
        return path
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        parts.append(f"{name}={REDACTED}" if equals and is_secret(name) else part)
    return f"{base}?{'&'.join(parts)}"


class RedactCredentials(logging.Filter):
    """On uvicorn's access logger, whose records carry (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install() -> None:
    """Add the filter to uvicorn's access logger (once; after uvicorn has configured its logging)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, RedactCredentials) for existing in logger.filters):
        logger.addFilter(RedactCredentials())

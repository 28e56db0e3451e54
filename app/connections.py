"""Connection-level limits uvicorn lacks: a deadline for each request's headers (a client that drips them, or never
finishes, would hold its connection forever), a cap on open connections, and a cap on the size of a request head,
each answered with an OpenAI-shaped error before the connection is closed.

The protocol is uvicorn's h11 one, chosen explicitly: h11 comes with uvicorn wherever it is installed (httptools is
optional, and `auto` would pick a different parser on different machines), and it buffers a bounded head.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import APIError

log = logging.getLogger("tokenmill.connections")

# Bytes of request line and headers a connection may buffer before its head is complete: past it, 431. Above the
# 32 KiB of header fields app.limits allows (which counts names and values only), so that limit answers first.
MAX_HEAD_BYTES = 64 * 1024
# h11's own ceiling on a buffered incomplete event; it must stay above ours plus one read (asyncio reads 256 KiB).
H11_MAX_INCOMPLETE_EVENT = MAX_HEAD_BYTES + 512 * 1024
# After an error answer (408, 431, 503 over the cap), how long the client's input is still read and dropped.
REFUSE_LINGER_SECONDS = 1.0
REFUSAL_LOG_INTERVAL = 10.0


def raw_response(error: APIError) -> bytes:
    """An error as raw HTTP/1.1 bytes ending the connection, for the moments h11 cannot send one (no request yet)."""
    body = json.dumps(error.to_body().to_dict()).encode()
    reason = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **{name.lower(): value for name, value in error.headers.items()},
    }
    head = f"HTTP/1.1 {error.status} {reason.get(error.status, '')}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection cap and a head-size cap. Configure a subclass
    with `protocol_class`: uvicorn builds one instance per connection from the class it is given."""

    header_timeout: float = 10.0
    max_connections: int | None = None
    last_refusal_logged = 0.0  # refusals come in floods: one log line per REFUSAL_LOG_INTERVAL

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False  # among the server's connections (uvicorn's bookkeeping ran)
        self._ending = False  # answered with an error: input is dropped until the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self.transport = transport
            self._log_refusal()
            message = f"The server has {self.max_connections} open connections, its limit; retry shortly."
            self._end_with(APIError.unavailable(message, retry_after=1))
            return
        super().connection_made(transport)
        self._counted = True
        self._arm_header_timer()  # also for a client that connects and never sends a byte

    def data_received(self, data: bytes) -> None:
        if self._ending:
            return
        super().data_received(data)
        self._track_head()

    def eof_received(self) -> None:
        if self._ending:
            self.transport.close()
            return
        super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_header_timer()  # a pipelined request's head is already arriving

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._counted:
            super().connection_lost(exc)

    def _track_head(self) -> None:
        """After each read: still waiting for a head (h11 IDLE with bytes buffered): keep the deadline running,
        and answer 431 once the head outgrows MAX_HEAD_BYTES; a head complete: the deadline is off."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()
            return
        if len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES:
            message = f"The request line and headers exceed {MAX_HEAD_BYTES} bytes."
            self._end_with(APIError(431, message, code="headers_too_large"))
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._ending or self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closing the connection of %s: no complete request headers within %g s", client, self.header_timeout)
        message = f"The request headers did not arrive within {self.header_timeout:g} s."
        self._end_with(APIError(408, message, code="request_timeout"))

    def _end_with(self, error: APIError) -> None:
        """Answer `error` and end the connection: the answer, then our end of the stream; what the client still
        sends is dropped, and the close comes when it closes or after REFUSE_LINGER_SECONDS. (Closing with unread
        input would reset the connection, and a reset can destroy an answer the client has not read yet.)"""
        self._cancel_header_timer()
        self._ending = True
        self.transport.write(raw_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._header_timer = self.loop.call_later(REFUSE_LINGER_SECONDS, self.transport.close)

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - type(self).last_refusal_logged >= REFUSAL_LOG_INTERVAL:
            type(self).last_refusal_logged = now
            log.warning("refusing new connections: %d are open (--max-connections)", len(self.connections))


def protocol_class(header_timeout: float, max_connections: int | None) -> type[GuardedH11Protocol]:
    """The class to give uvicorn.Config(http=...), configured with these limits."""
    attributes = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("TokenmillH11Protocol", (GuardedH11Protocol,), attributes)

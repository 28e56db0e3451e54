"""Limits enforced before a request reaches a route: 431 for too many or too large headers, 413 for bodies over the
size limit, declared or streamed, and 408 for a client that drips its body slower than the read timeout allows (it
would hold a connection forever)."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError


class BodyTooLarge(HTTPException):
    """An HTTPException, because FastAPI turns any other error raised while it reads a body into a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than {max_bytes} bytes.")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"The request body did not arrive within {seconds:g} s.")


MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        if len(raw_headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in raw_headers) > MAX_HEADER_BYTES:
            message = f"Request headers exceed {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes."
            await APIError(431, message, code="headers_too_large").to_response(scope["path"])(scope, receive, send)
            return
        declared = dict(raw_headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await APIError.request_too_large(self.max_bytes).to_response(scope["path"])(scope, receive, send)
            return
        seen = 0
        started = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # later receives wait for a disconnect, for as long as the response takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                raise BodyTimeout(self.read_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await APIError.request_too_large(self.max_bytes).to_response(scope["path"])(scope, receive, send)
        except BodyTimeout as exc:
            if not started:
                error = APIError(408, str(exc.detail), code="request_timeout", headers={"Connection": "close"})
                await error.to_response(scope["path"])(scope, receive, send)

"""Anthropic's error body, `{"type": "error", "error": {"type", "message"}}`, for the Messages routes. The shape is
chosen by path where an `APIError` becomes a response, so one set of handlers and middlewares serves both APIs."""

from __future__ import annotations

from typing import Literal

from app.protocol_responses import _Response

MESSAGES_PATH = "/v1/messages"

# Anthropic's error types by HTTP status; others are invalid_request_error (4xx) or api_error (5xx).
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether a request path belongs to the Messages API (and its errors take Anthropic's shape)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


class ErrorDetail(_Response):
    type: str
    message: str


class ErrorResponse(_Response):
    type: Literal["error"] = "error"
    error: ErrorDetail

    @classmethod
    def of(cls, status: int, message: str, param: str | None = None) -> ErrorResponse:
        """The body has no field for the parameter at fault: the message starts with it, as Anthropic's do."""
        kind = _TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
        if param and param not in message:
            message = f"{param}: {message}"
        return cls(error=ErrorDetail(type=kind, message=message))

    def to_sse(self) -> str:
        """The `error` event that ends a stream which failed after it started."""
        return f"event: error\ndata: {self.to_json()}\n\n"

"""OpenAI-shaped errors: `APIError` for the app's own failures, and handlers that give every failure the body
`{"error": {"message", "type", "param", "code"}}`, so no client sees FastAPI's 422 or a bare 500 page. Under
/v1/messages the same failures take Anthropic's shape (`APIError.to_response` picks it by path).
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.anthropic.errors import ErrorResponse as AnthropicErrorResponse
from app.anthropic.errors import speaks_anthropic
from app.protocol_responses import ErrorDetail, ErrorResponse
from worker.messages import InvalidRequest

logger = logging.getLogger(__name__)

_LOC_ROOTS = frozenset({"body", "query", "path", "header", "cookie"})
_FIELD_NAME = re.compile(r"[a-z0-9_]+")
# pydantic puts the tried member of a union in `loc` ('str', 'list[TextContentPart]'); they are not fields
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})  # the body as a whole
_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's words, for any failure but a JSON syntax error


def invalid(param: str, message: str, code: str | None = "invalid_value") -> PydanticCustomError:
    """A validation error for `param` (relative to where it is raised), raised inside a request model's validators;
    the handler below reads param and code from its ctx."""
    return PydanticCustomError("invalid_request", "{message}", {"message": message, "param": param, "code": code})


class APIError(Exception):
    """A failure the client should see as it is. Raise it anywhere in a request; the handler renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def to_response(self, path: str) -> JSONResponse:
        """The error in the shape of the API `path` belongs to: Anthropic's under /v1/messages, OpenAI's elsewhere;
        the status and headers (Retry-After, WWW-Authenticate) are the same in both."""
        body = self.to_anthropic() if speaks_anthropic(path) else self.to_body()
        return JSONResponse(body.to_dict(), status_code=self.status, headers=self.headers)

    def to_anthropic(self) -> AnthropicErrorResponse:
        return AnthropicErrorResponse.of(self.status, self.message, self.param)

    @classmethod
    def invalid_request(cls, message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def context_length_exceeded(
        cls, max_model_len: int, prompt_tokens: int, max_tokens: int | None = None, param: str = "messages"
    ) -> APIError:
        """The prompt (plus the requested completion) does not fit the model; `param` is 'messages' or 'prompt'."""
        if max_tokens is None:
            asked = f"your prompt has {prompt_tokens} tokens"
        else:
            asked = (
                f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, "
                f"{max_tokens} in the completion)"
            )
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, {asked}. "
            f"Please reduce the length of the {param} or completion."
        )
        return cls(400, message, param=param, code="context_length_exceeded")

    @classmethod
    def invalid_api_key(cls) -> APIError:
        return cls(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        message = f"The model `{model}` does not exist."
        return cls(404, message, param="model", code="model_not_found")

    @classmethod
    def request_too_large(cls, max_bytes: int) -> APIError:
        return cls(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")

    @classmethod
    def rate_limited(cls, message: str, retry_after: float | None = None) -> APIError:
        """429 in OpenAI's shape (type 'requests', code 'rate_limit_exceeded'), with Retry-After in seconds."""
        return cls(429, message, type="requests", code="rate_limit_exceeded", headers=_retry_after(retry_after))

    @classmethod
    def unavailable(cls, message: str, retry_after: float | None = None) -> APIError:
        """503: the model is not ready yet, or its worker is gone."""
        return cls(503, message, type="server_error", code="service_unavailable", headers=_retry_after(retry_after))

    @classmethod
    def worker_lost(cls, model: str, restarting: bool) -> APIError:
        """503 for the requests a worker took down with it. How it went (signals, socket errors) is in the log; the
        client gets a fixed text and code that say what to do."""
        if restarting:
            message = f"The worker for model '{model}' stopped unexpectedly; it is being restarted. Retry the request."
            return cls(503, message, type="server_error", code="worker_restarting", headers=_retry_after(5))
        message = f"The worker for model '{model}' stopped unexpectedly and kept failing; the model is out of service."
        return cls(503, message, type="server_error", code="model_failed")

    @classmethod
    def internal(cls, request_id: str) -> APIError:
        message = f"The server had an error while processing your request (request id {request_id})."
        return cls(500, message, type="server_error", headers={"x-request-id": request_id})


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """A 400 naming the offending field, from pydantic's `errors()` (also for models validated by hand)."""
    if not errors:
        return APIError.invalid_request("The request is invalid.")
    if any(error.get("type") == "json_invalid" for error in errors):
        return APIError.invalid_request("We could not parse the JSON body of your request.", code="invalid_json")
    paths = [_path(error) for error in errors]
    # The first field at fault; among its errors (one per member of a union), the one that got deepest.
    top = paths[0][:1]
    best = max((i for i, path in enumerate(paths) if path[:1] == top), key=lambda i: len(paths[i]))
    error, param = errors[best], ".".join(paths[best]) or None
    kind, message = error.get("type"), str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "invalid_request":
        code = error.get("ctx", {}).get("code") or "invalid_value"
        return APIError.invalid_request(message, param, code)
    if kind == "extra_forbidden":
        return APIError.invalid_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        text = f"Missing required parameter: '{param}'." if param else "The request needs a JSON body."
        return APIError.invalid_request(text, param, "missing_required_parameter")
    if param is None and kind in _NOT_AN_OBJECT:
        return APIError.invalid_request("The request body must be a JSON object.", None, "invalid_value")
    text = f"Invalid value for '{param}': {message}" if param else message
    return APIError.invalid_request(text, param, "invalid_value")


def _path(error: Mapping[str, Any]) -> list[str]:
    loc = list(error.get("loc", ()))
    if loc and loc[0] in _LOC_ROOTS:
        loc = loc[1:]
    parts = [str(item) for item in loc if isinstance(item, int) or _is_field(item)]
    extra = error.get("ctx", {}).get("param") if error.get("type") == "invalid_request" else None
    if extra:
        parts.append(str(extra))
    return parts


def _is_field(item: object) -> bool:
    return isinstance(item, str) and bool(_FIELD_NAME.fullmatch(item)) and item not in _UNION_TAGS


def request_id_of(request: Request) -> str:
    """The id a proxy or our middleware gave the request, or a new one."""
    given = getattr(request.state, "request_id", None) or request.headers.get("x-request-id")
    return str(given) if given else f"req_{uuid.uuid4().hex}"


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.to_response(request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    unparsed = any(error.get("type") in _NOT_AN_OBJECT and not _path(error) for error in errors)
    if unparsed and not _is_json(request.headers.get("content-type")):
        return unsupported_media_type(request.headers.get("content-type")).to_response(request.url.path)
    return from_validation_errors(errors).to_response(request.url.path)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def unsupported_media_type(content_type: str | None) -> APIError:
    """A body sent as something other than JSON, which FastAPI leaves unparsed. Refused, as vLLM does, rather than
    parsed anyway: a browser may send text/plain across origins without asking first (a CSRF door)."""
    sent = f"'{content_type}'" if content_type else "no Content-Type"
    message = f"The request body must be JSON sent with Content-Type: application/json; this one came with {sent}."
    return APIError(415, message, code="unsupported_media_type")


def _unparsable_body(cause: BaseException | None) -> APIError:
    """FastAPI's 400 for a body it could not read as JSON, saying why."""
    if isinstance(cause, UnicodeDecodeError):
        message = f"The request body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at {cause.start})."
    elif isinstance(cause, RecursionError):
        message = "The request body's JSON is nested too deeply to parse."
    else:
        message = "We could not parse the JSON body of your request."
    return APIError.invalid_request(message, code="invalid_json")


async def _on_invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    return APIError.invalid_request(str(exc), exc.param, "invalid_value").to_response(request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and exc.detail == "Not Found":
        error = APIError(404, f"Invalid URL ({where})", code="unknown_url", headers=headers)
    elif exc.status_code == 405:
        error = APIError(405, f"Method not allowed ({where})", code="method_not_allowed", headers=headers)
    elif exc.status_code == 413:
        error = APIError(413, "The request body is too large.", code="request_too_large", headers=headers)
    elif exc.status_code == 400 and exc.detail == _PARSE_FAILED:
        error = _unparsable_body(exc.__cause__)
    elif exc.status_code == 408:
        error = APIError(408, str(exc.detail), code="request_timeout", headers={"Connection": "close", **headers})
    else:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        error = APIError(exc.status_code, str(exc.detail), type=kind, headers=headers)
    return error.to_response(request.url.path)


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request)
    logger.error("unhandled error in %s %s (request id %s)", request.method, request.url.path, request_id, exc_info=exc)
    return APIError.internal(request_id).to_response(request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes an error body (OpenAI's, or Anthropic's under /v1/messages): ours, validation (400, never
    422), HTTP errors and crashes."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(InvalidRequest, _on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unhandled)

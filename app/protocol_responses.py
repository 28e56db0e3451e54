"""OpenAI's response bodies, stream chunks and errors as pydantic models: every JSON body the API sends is one of these.

`to_json()` omits unset optional fields as OpenAI does, but keeps those OpenAI always sends, even as null.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
SSE_DONE = "data: [DONE]\n\n"
_LOWEST_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this instead


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else _LOWEST_LOGPROB


Logprob = Annotated[float, AfterValidator(_finite_logprob)]


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style: 'chatcmpl-...', 'cmpl-...'."""
    return f"{prefix}-{uuid.uuid4().hex}"


class _Response(BaseModel):
    # Fields serialized even when None (OpenAI always sends them); every other None field is omitted.
    ALWAYS: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _keep_always(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not self.ALWAYS:
            return data
        return {name: data.get(name) for name in type(self).model_fields if name in data or name in self.ALWAYS}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    def to_sse(self) -> str:
        """One server-sent event carrying this object; end a stream with `SSE_DONE`."""
        return f"data: {self.to_json()}\n\n"


class NamedEvent(_Response):
    """A server-sent event whose type also goes in an `event:` line before its data, as Anthropic's Messages API and
    OpenAI's Responses API send them (chat completions' chunks have none)."""

    type: str

    def to_sse(self) -> str:
        return f"event: {self.type}\ndata: {self.to_json()}\n\n"


_MARK = "\x00"  # stands for the text in a rendered template: no detokenized text carries it in the same place
_encode_text = json.JSONEncoder(ensure_ascii=False).encode


class TextEvents:
    """The SSE events of a stream's plain text deltas, which differ only in the text (and the choice index): each
    choice's event is rendered once with a mark for the text, and later ones are the template around the text's JSON.
    Pydantic rendered one in about 23 us; at 32 streams that was a fifth of the API process's CPU time a step, time
    the worker sharing its cores lost. `render(index, text)` gives the full response object."""

    def __init__(self, render: Callable[[int, str], _Response]) -> None:
        self._render = render
        self._templates: dict[int, tuple[str, str] | None] = {}

    def event(self, index: int, text: str) -> str:
        if index not in self._templates:
            rendered, mark = self._render(index, _MARK).to_sse(), _encode_text(_MARK)
            head, _, tail = rendered.partition(mark)
            self._templates[index] = (head, tail) if rendered.count(mark) == 1 else None
        template = self._templates[index]
        if template is None:
            return self._render(index, text).to_sse()
        return template[0] + _encode_text(text) + template[1]


# --- usage and logprobs ------------------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class RequestMetrics(_Response):
    """Where one request's time went (ours, asked for with `return_metrics` or `--request-metrics`). Times are in
    milliseconds from the request's arrival in the API; with n > 1 or several prompts, the first token is the first
    of any choice, and the inter-token gap and the rate count every choice's tokens."""

    ALWAYS = frozenset({"time_to_first_token_ms", "mean_inter_token_ms", "tokens_per_second"})
    queue_time_ms: float  # waiting in the worker before the first step that ran the request
    time_to_first_token_ms: float | None  # None: no token came (max_tokens 0, or a stop before any)
    mean_inter_token_ms: float | None  # between a choice's tokens after its first; None with fewer than two
    e2e_ms: float  # arrival to the last token
    prefill_tokens: int  # prompt tokens computed (the prompt less the cached ones)
    cached_tokens: int  # prompt tokens taken from the prefix cache
    decode_tokens: int  # generated tokens
    tokens_per_second: float | None  # generated tokens a second after the first token (1000 / the gap)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


class TopLogprob(_Response):
    ALWAYS = frozenset({"bytes"})
    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    """One generated token of a chat choice: its text, logprob, UTF-8 bytes and the top alternatives."""

    ALWAYS = frozenset({"bytes"})
    token: str
    logprob: Logprob
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class CompletionLogprobs(_Response):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptTokenLogprob(_Response):
    """vLLM's prompt_logprobs entry of one token: its logprob, its rank (1: the most likely) and its text."""

    logprob: Logprob
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (null for the first) the token and the top alternatives by token id
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


# --- chat completions --------------------------------------------------------------------------------------------


class ChatResponseMessage(_Response):
    ALWAYS = frozenset({"content"})
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # the thinking (vLLM's name); `reasoning` is the same text (the newer name)
    reasoning: str | None = None


class ChatChoice(_Response):
    ALWAYS = frozenset({"logprobs"})
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, where the request asks for them
    metrics: RequestMetrics | None = None  # ours, where asked for


class ChatDelta(_Response):
    """A stream's increment: the role in a choice's first chunk, then content; absent fields are omitted."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # ToolCallDelta.to_dict(): index, then id/type/name, arguments
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(_Response):
    ALWAYS = frozenset({"logprobs", "finish_reason"})
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    """One SSE event of a chat stream; the usage chunk at the end has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    metrics: RequestMetrics | None = None  # in the usage chunk, where asked for


# --- completions -------------------------------------------------------------------------------------------------


class CompletionChoice(_Response):
    ALWAYS = frozenset({"logprobs", "finish_reason"})
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, where the request asks for them


class CompletionResponse(_Response):
    """A completions response, and also each event of a completions stream (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    metrics: RequestMetrics | None = None  # in the response or a stream's usage chunk, where asked for


# --- models, tokenize, errors ------------------------------------------------------------------------------------


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tokenmill"
    root: str | None = None  # vLLM's extension: the served model an alias points to (itself otherwise)
    max_model_len: int | None = None  # vLLM's extension
    state: Literal["loaded", "loading", "unloaded", "failed"] | None = None  # ours, like the four below
    task: Literal["generate", "embed"] | None = None  # the endpoints it answers: chat and completions, or embeddings
    quantization: str | None = None
    lora: str | None = None
    native_kernels: bool | None = None  # a CPU model: whether the C kernels serve it; if not, why
    native_kernels_reason: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class ErrorDetail(_Response):
    ALWAYS = frozenset({"param", "code"})
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 values for encoding_format base64


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage

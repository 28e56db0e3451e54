"""Anthropic's Messages response body and stream events as pydantic models; every event is sent as
`event: <type>` and `data: <json>` lines."""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.generation import Choice
from app.protocol_responses import NamedEvent, _Response

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def tool_use_id(call_id: str) -> str:
    """Anthropic's id for a tool call the parser named in OpenAI's style ('call_...')."""
    return "toolu_" + call_id.removeprefix("call_")


def thinking_signature(thinking: str) -> str:
    """An opaque signature for a thinking block: a digest of its text, the same for the same text. Nothing checks it
    when the block comes back; it is there because Anthropic's clients expect one."""
    digest = hashlib.sha256(b"tokenmill-thinking\0" + thinking.encode()).digest()
    return "tm1" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


class ThinkingContent(_Response):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class TextContent(_Response):
    type: Literal["text"] = "text"
    text: str


class ToolUseContent(_Response):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class MessageUsage(_Response):
    """`input_tokens` is the whole prompt: the prefix cache is not Anthropic's prompt caching, so the cache fields
    stay null."""

    input_tokens: int
    output_tokens: int


class MessageResponse(_Response):
    """The reply, and (empty, without a stop reason) the message of a stream's message_start."""

    ALWAYS: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingContent | TextContent | ToolUseContent]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class MessageStart(NamedEvent):
    type: Literal["message_start"] = "message_start"
    message: MessageResponse


class BlockStart(NamedEvent):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ThinkingContent | TextContent | ToolUseContent


class TextDelta(_Response):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(_Response):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(_Response):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class InputJsonDelta(_Response):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class BlockDelta(NamedEvent):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class BlockStop(NamedEvent):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(_Response):
    ALWAYS: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})
    stop_reason: StopReason
    stop_sequence: str | None = None


class OutputUsage(_Response):
    output_tokens: int


class MessageDelta(NamedEvent):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: OutputUsage


class MessageStop(NamedEvent):
    type: Literal["message_stop"] = "message_stop"


class Ping(NamedEvent):
    type: Literal["ping"] = "ping"


class CountTokensResponse(_Response):
    input_tokens: int


def stop_reason(choice: Choice, called: bool) -> tuple[StopReason, str | None]:
    """Anthropic's stop reason, and the stop sequence that matched: a stop sequence, the max_tokens limit, a reply
    that made tool calls, or the model's own end."""
    if choice.detok.stopped:
        return "stop_sequence", choice.detok.stop_string
    if choice.finish_reason == "length":
        return "max_tokens", None
    return ("tool_use" if called else "end_turn"), None

"""Anthropic's Messages request bodies as pydantic models, and their mapping onto what the chat pipeline takes:
template messages, OpenAI tool definitions, a forced call, sampling params.

As for chat completions, unknown fields are rejected, never dropped; documented fields and content blocks we cannot
serve (images, documents, server tools) are refused by name. `cache_control` is accepted and ignored: the prefix cache
reuses any shared prefix by itself.

`thinking` turns a thinking model's thinking on (`enabled`, `adaptive`) or off (`disabled`, or no `thinking`): the
chat template gets `enable_thinking` accordingly. Thinking blocks sent back in assistant turns go to the template as
the message's `reasoning_content` (the template keeps or drops them, as it does for chat completions); their
signatures are not checked.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator

from app.errors import invalid
from app.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, OneReply, _Body, _drop_no_ops, _Strict
from worker.messages import SamplingParams

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BLOCK_TYPES = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})
_THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive"})
MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens
# Fields Anthropic documents that we do not support: rejected by name unless null or one of these no-op values.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "service_tier": ("auto", "standard_only"),
    "container": (),
    "mcp_servers": ([],),
    "context_management": (),
}


def _served_block(value: Any) -> Any:
    """A content block of a type we cannot serve is refused with its field named, rather than as a union mismatch."""
    if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] not in _BLOCK_TYPES:
        raise invalid("type", f"content blocks of type '{value['type']}' are not supported by this server", None)
    return value


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None  # sent back with an earlier reply's text; ours never carry any


class ThinkingBlock(_Strict):
    """An earlier reply's thinking, sent back in its assistant turn. The signature is taken as it is, not checked."""

    type: Literal["thinking"]
    thinking: str
    signature: str
    cache_control: CacheControl | None = None


class RedactedThinkingBlock(_Strict):
    """Thinking another server redacted; this one never writes any, and leaves it out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str
    cache_control: CacheControl | None = None


class DirectCaller(_Strict):
    type: Literal["direct"]


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: DirectCaller | None = None  # sent back with an earlier reply's tool_use


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock, BeforeValidator(_served_block)]] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock, Field(discriminator="type")
]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Annotated[Block, BeforeValidator(_served_block)]]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> Self:
        for index, block in enumerate([] if isinstance(self.content, str) else self.content):
            if block.type == "tool_use" and self.role != "assistant":
                raise invalid(f"content.{index}", "tool_use blocks belong in assistant messages")
            if block.type == "tool_result" and self.role != "user":
                raise invalid(f"content.{index}", "tool_result blocks belong in user messages")
            if block.type in ("thinking", "redacted_thinking") and self.role != "assistant":
                raise invalid(f"content.{index}", f"{block.type} blocks belong in assistant messages")
        return self

    def to_template(self) -> list[dict[str, Any]]:
        """The message as chat-template messages, as chat completions would send it: a user turn's tool results
        become tool messages (before its text), an assistant turn's tool_use blocks its tool_calls, its thinking
        blocks its `reasoning_content` (redacted thinking is left out)."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        texts = [block.text for block in self.content if isinstance(block, TextBlock)]
        thoughts = [block.thinking for block in self.content if isinstance(block, ThinkingBlock)]
        reasoning = {"reasoning_content": "\n".join(thoughts)} if thoughts else {}
        out: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
            for block in self.content
            if isinstance(block, ToolResultBlock)
        ]
        calls = [
            {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}}
            for block in self.content
            if isinstance(block, ToolUseBlock)
        ]
        if calls:
            out.append({"role": "assistant", "content": "\n".join(texts), **reasoning, "tool_calls": calls})
        elif texts or not out:
            out.append({"role": self.role, "content": "\n".join(texts), **reasoning})
        return out


def _served_thinking(value: Any) -> Any:
    """A thinking type we do not serve ('between_tools') is refused by name, rather than as a union mismatch."""
    if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] not in _THINKING_TYPES:
        raise invalid("type", f"thinking of type '{value['type']}' is not supported by this server", None)
    return value


class ThinkingEnabled(_Strict):
    """Thinking on, with a budget. The budget is checked as Anthropic checks it (at least 1024, less than
    max_tokens) and is otherwise advisory: max_tokens caps thinking and answer together."""

    type: Literal["enabled"]
    budget_tokens: int
    display: Literal["summarized", "omitted"] | None = None

    @field_validator("budget_tokens")
    @classmethod
    def _budget(cls, value: int) -> int:
        if value < MIN_THINKING_BUDGET:
            raise invalid("", f"budget_tokens must be at least {MIN_THINKING_BUDGET}, not {value}")
        return value


class ThinkingAdaptive(_Strict):
    """Thinking on; the model decides how much."""

    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


Thinking = Annotated[
    Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")],
    BeforeValidator(_served_thinking),
]


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise invalid("type", f"server tools ('{kind}') are not supported by this server; only client tools", None)
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TOOL_NAME.fullmatch(value):
            raise invalid("", "tool names are 1 to 128 letters, digits, underscores or dashes")
        return value

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.input_schema}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class Conversation(_Body):
    """What /v1/messages and /v1/messages/count_tokens share: the model, the conversation and the tools."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = None
    thinking: Thinking | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return _drop_no_ops(data, _UNSUPPORTED)

    @model_validator(mode="after")
    def _check_conversation(self) -> Self:
        if self.messages[-1].role == "assistant":
            at = f"messages.{len(self.messages) - 1}"
            raise invalid(f"{at}.role", "a final assistant message (prefill) is not supported by this server")
        names = [tool.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise invalid("tools", "two tools have the same name")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise invalid("tool_choice.name", f"tool_choice names '{choice.name}', which is not among the tools")
        if isinstance(choice, ToolChoiceAny) and not names:
            raise invalid("tool_choice", "tool_choice 'any' needs tools")
        return self

    @property
    def thinks(self) -> bool:
        """Whether thinking is on: `enabled` or `adaptive`. Off (`disabled`, or no `thinking`, as for Anthropic's
        models that think only when asked), a thinking model's thinking is left out of the reply."""
        return isinstance(self.thinking, ThinkingEnabled | ThinkingAdaptive)

    @property
    def omits_thinking(self) -> bool:
        """display 'omitted': thinking blocks come with their signature and empty text."""
        return isinstance(self.thinking, ThinkingEnabled | ThinkingAdaptive) and self.thinking.display == "omitted"

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template gets beside the messages: `enable_thinking` (read by Qwen3's and its kind; other
        templates ignore it)."""
        return {"enable_thinking": self.thinks}

    def template_messages(self) -> list[dict[str, Any]]:
        system = self.system if isinstance(self.system, str) or self.system is None else _joined(self.system)
        head = [{"role": "system", "content": system}] if system else []
        return head + [item for message in self.messages for item in message.to_template()]

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template receives them (OpenAI's definitions; none for tool_choice 'none')."""
        if isinstance(self.tool_choice, ToolChoiceNone):
            return []
        return [tool.to_openai() for tool in self.tools or []]

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools a call is forced to: all of them for 'any', the named one for 'tool'; None: no call forced."""
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceAny):
            return self.offered_tools()
        if isinstance(choice, ToolChoiceTool):
            return [tool.to_openai() for tool in self.tools or [] if tool.name == choice.name]
        return None

    @property
    def parallel_tool_calls(self) -> bool:
        """Whether a forced call may be several calls: not for a named tool, nor with parallel tool use off."""
        choice = self.tool_choice
        return isinstance(choice, ToolChoiceAuto | ToolChoiceAny) and not choice.disable_parallel_tool_use


def _joined(blocks: list[TextBlock]) -> str:
    return "\n".join(block.text for block in blocks)


class Metadata(_Strict):
    user_id: str | None = None


class CountTokensRequest(Conversation):
    """POST /v1/messages/count_tokens."""


class MessagesRequest(OneReply, Conversation):
    """POST /v1/messages. The attributes below `stream` are what the chat pipeline asks any request for."""

    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _check_budget(self) -> Self:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            budget = self.thinking.budget_tokens
            message = f"max_tokens ({self.max_tokens}) must be greater than thinking.budget_tokens ({budget})"
            raise invalid("thinking.budget_tokens", message)
        return self

    @field_validator("stop_sequences")
    @classmethod
    def _check_stops(cls, value: list[str] | None) -> list[str] | None:
        if value and ("" in value or any(len(stop) > MAX_STOP_CHARS for stop in value)):
            raise invalid("", f"stop_sequences must be non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop_sequences or [])

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Anthropic's defaults: temperature 1, no top_p or top_k filter; max_tokens is always given."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
        )


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (the JSON text the model wrote) as a tool_use block's input object; a call without
    arguments, or with ones that are not a JSON object, has an empty input."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

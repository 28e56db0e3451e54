"""The Responses API's Response object, output items and stream events as pydantic models; every event is sent as
`event: <type>` and `data: <json>` lines and carries its place in the stream (`sequence_number`)."""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.generation import Generation
from app.protocol_responses import NamedEvent, _Response

Status = Literal["in_progress", "completed", "incomplete", "failed"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


def new_id(prefix: str) -> str:
    """An id in the Responses API's style: 'resp_...', 'msg_...', 'fc_...'."""
    return f"{prefix}_{secrets.token_hex(24)}"


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(_Response):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(_Response):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(_Response):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Response):
    """A thinking model's thinking, before the message. No summary is written (`summary` stays empty)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = ReasoningItem | OutputMessage | FunctionCall


class InputTokensDetails(_Response):
    """`cached_tokens`: served from the prefix cache; nothing is written to a prompt cache of OpenAI's kind."""

    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(_Response):
    reasoning_tokens: int = 0


class ResponseUsage(_Response):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached_tokens: int) -> ResponseUsage:
        return cls(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        )


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens"]


class ResponseError(_Response):
    code: str
    message: str


class Response(_Response):
    """The response, whole or (in_progress, without output) at the start of a stream. The request's settings are
    echoed as OpenAI echoes them; `store` is false, as nothing is stored."""

    ALWAYS: ClassVar[frozenset[str]] = frozenset(
        {"error", "incomplete_details", "instructions", "max_output_tokens", "previous_response_id", "usage", "user"}
    )
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Status
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: bool = False
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    reasoning: dict[str, Any] | None = None

    def finished(self, output: list[OutputItem], gen: Generation, reasoning_tokens: int = 0) -> Response:
        """The response once its generation ended: completed, or incomplete at max_output_tokens (its last item
        too), with its usage; `reasoning_tokens` of the output tokens were thinking."""
        incomplete = gen.choices[0].finish_reason == "length"
        if incomplete and output:
            output[-1].status = "incomplete"
        usage = ResponseUsage.of(gen.num_prompt_tokens, gen.num_completion_tokens, gen.num_cached_tokens)
        usage.output_tokens_details.reasoning_tokens = reasoning_tokens
        return self.model_copy(
            update={
                "status": "incomplete" if incomplete else "completed",
                "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
                "output": output,
                "usage": usage,
            }
        )


class _Event(NamedEvent):
    sequence_number: int


class ResponseEvent(_Event):
    """response.created, response.in_progress, response.completed, response.incomplete, response.failed."""

    response: Response


class ItemEvent(_Event):
    """response.output_item.added and .done."""

    output_index: int
    item: OutputItem


class _InItem(_Event):
    """An event about one output item."""

    item_id: str
    output_index: int


class PartEvent(_InItem):
    """response.content_part.added and .done."""

    content_index: int
    part: OutputText | ReasoningText


class TextDelta(_InItem):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDone(_InItem):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDelta(_InItem):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class ArgumentsDone(_InItem):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    name: str
    arguments: str


class ReasoningDelta(_InItem):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    content_index: int
    delta: str


class ReasoningDone(_InItem):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    content_index: int
    text: str

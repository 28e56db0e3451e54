"""The Responses API's input items (messages, function calls and their outputs) as pydantic models, and their mapping
onto the chat template's messages as chat completions would send the same conversation.

Items and content parts we cannot serve (images, files, audio, item references to stored responses) are refused by
name, rather than as a union mismatch. Reasoning items sent back go to the template as the `reasoning_content` of the
assistant message after them (the template keeps or drops it, as it does for chat completions).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Tag

from app.errors import invalid
from app.protocol import _Strict, template_arguments

Status = Literal["in_progress", "completed", "incomplete"]


def of_types(*kinds: str, what: str) -> BeforeValidator:
    """Refuses `what` (a union of objects told apart by `type`) of a type we do not serve, naming it, before the
    union tries its members."""

    def check(value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind not in kinds:
            raise invalid("type", f"{what} of type '{kind}' are not supported by this server", None)
        return value

    return BeforeValidator(check)


def by_type(value: Any) -> str | None:
    """The member of a union that a value's `type` picks, as a tag in CamelCase: error paths leave such tags out
    (app.errors), where the snake_case type itself would read as a field ('input.0.message.content')."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "".join(word.capitalize() for word in kind.split("_")) if isinstance(kind, str) else None


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """An earlier reply's text, sent back with its assistant message; ours never carry annotations or logprobs."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


Part = Annotated[
    Annotated[InputText, Tag("InputText")] | Annotated[OutputText, Tag("OutputText")],
    Discriminator(by_type, custom_error_type="invalid_request", custom_error_message="a content part needs a type"),
    of_types("input_text", "output_text", what="content parts"),
]


def joined(parts: str | list[InputText] | list[Part]) -> str:
    return parts if isinstance(parts, str) else "\n".join(part.text for part in parts)


class Message(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Part]
    id: str | None = None  # sent back with an earlier reply's message
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCall(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Status | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Annotated[InputText, of_types("input_text", what="function outputs")]]
    id: str | None = None
    status: Status | None = None


class SummaryText(_Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Strict):
    type: Literal["reasoning_text"]
    text: str


class Reasoning(_Strict):
    """An earlier reply's reasoning item. Its text (`content`) is templated; summaries and encrypted content (this
    server writes neither) are not."""

    type: Literal["reasoning"]
    summary: list[SummaryText]
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: Status | None = None

    def text(self) -> str:
        return "\n".join(part.text for part in self.content or [])


def _typed(value: Any) -> Any:
    """A message may come without its type (OpenAI's 'easy' input message)."""
    if isinstance(value, dict) and "type" not in value and "role" in value:
        return {**value, "type": "message"}
    return value


Item = Annotated[
    Annotated[Message, Tag("Message")]
    | Annotated[FunctionCall, Tag("FunctionCall")]
    | Annotated[FunctionCallOutput, Tag("FunctionCallOutput")]
    | Annotated[Reasoning, Tag("Reasoning")],
    Discriminator(by_type, custom_error_type="invalid_request", custom_error_message="an input item needs a type"),
    of_types("message", "function_call", "function_call_output", "reasoning", what="input items"),
    BeforeValidator(_typed),
]


def template_messages(instructions: str | None, items: str | list[Item]) -> list[dict[str, Any]]:
    """The conversation as chat-template messages: the instructions as a system message first, a developer message
    as a system one, a run of function calls as one assistant message's tool_calls (joined to the assistant text
    before them), a function call's output as a tool message. A reasoning item's text becomes the
    `reasoning_content` of the assistant message its reply opened (the next message or function call); one that no
    assistant turn follows is left out."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    reasoning: list[str] = []  # reasoning items waiting for the assistant turn they belong to
    for item in [Message(role="user", content=items)] if isinstance(items, str) else items:
        if isinstance(item, Reasoning):
            reasoning.append(item.text())
            continue
        if isinstance(item, Message):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": joined(item.content)})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": joined(item.output)})
        else:
            function = {"name": item.name, "arguments": template_arguments(item.arguments)}
            call = {"id": item.call_id, "type": "function", "function": function}
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        turn = out[-1]
        if turn["role"] == "assistant" and any(reasoning):
            turn["reasoning_content"] = "\n".join(text for text in reasoning if text)
        reasoning = []
    return out

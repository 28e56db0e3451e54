"""The Responses API's request body as a pydantic model, and its mapping onto what the chat pipeline takes: template
messages, OpenAI tool definitions, a forced call, a structured output, sampling params.

As for chat completions, unknown fields are rejected, never dropped; documented fields we cannot serve (state kept
between requests, background runs, built-in tools) are refused by name. `store` is accepted: nothing is stored.

`reasoning.effort` `none` turns a thinking model's thinking off (the chat template gets `enable_thinking` false, and
the reply has no reasoning item); any other effort turns it on (`enable_thinking` true) and is otherwise advisory.
Without `reasoning` the template does as it does by default. `reasoning.summary` is accepted; no summary is written.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Discriminator, Field, Tag, model_validator

from app.errors import invalid
from app.protocol import FunctionDefinition, OneReply, _Body, _drop_no_ops, _Strict
from app.responses_api.items import Item, by_type, of_types, template_messages
from worker.messages import SamplingParams, StructuredOutput

# Fields OpenAI documents that we do not support: rejected by name unless null or one of these no-op values.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (False,),
    "conversation": (),
    "previous_response_id": (),
    "prompt": (),
    "include": ([],),
    "max_tool_calls": (),
    "service_tier": ("auto", "default"),
    "truncation": ("disabled",),
    "top_logprobs": (0,),
    "stream_options": ({"include_obfuscation": False},),
    "context_management": (),
}


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape: chat completions' function with its type beside it."""

    type: Literal["function"]

    def to_openai(self) -> dict[str, Any]:
        """The tool as chat completions takes it, so the template sees the same definition."""
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    name: str
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: (
        Annotated[
            Annotated[TextFormat, Tag("Text")]
            | Annotated[JsonObjectFormat, Tag("JsonObject")]
            | Annotated[JsonSchemaFormat, Tag("JsonSchema")],
            Discriminator(by_type, custom_error_type="invalid_request", custom_error_message="format needs a type"),
        ]
        | None
    ) = None
    verbosity: Literal["medium"] | None = None  # the only one a model without that training can honour


Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
SummaryKind = Literal["auto", "concise", "detailed"]


class ReasoningConfig(_Strict):
    effort: Effort | None = None
    summary: SummaryKind | None = None
    generate_summary: SummaryKind | None = None  # the older name of summary


class ResponsesRequest(OneReply, _Body):
    """POST /v1/responses. The attributes below `store` are what the chat pipeline asks any request for."""

    CONVERSATION: ClassVar[str] = "input"  # the field a prompt too long for the context is blamed on
    model: str
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache reuses any shared prefix by itself
    parallel_tool_calls: bool = True
    tool_choice: (
        Literal["auto", "none", "required"] | Annotated[FunctionChoice, of_types("function", what="tool_choice values")]
    ) = "auto"
    tools: list[Annotated[FunctionTool, of_types("function", what="tools")]] = Field(
        default_factory=list, max_length=128
    )
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("previous_response_id") is not None:
            message = "previous_response_id is not supported: this server stores no responses; send the whole input"
            raise invalid("previous_response_id", message, "unsupported_parameter")
        return _drop_no_ops(data, _UNSUPPORTED)

    @model_validator(mode="after")
    def _check_request(self) -> Self:
        if isinstance(self.input, list) and not self.input:
            raise invalid("input", "input needs at least one item")
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise invalid("tools", "two tools have the same name")
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice) and choice.name not in names:
            raise invalid("tool_choice.name", f"tool_choice names '{choice.name}', which is not among the tools")
        if choice == "required" and not names:
            raise invalid("tool_choice", "tool_choice 'required' needs tools")
        if self.forced_tools() is not None and self.structured_output() is not None:
            raise invalid("tool_choice", "a forced tool call cannot be combined with a text.format constraint")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.instructions, self.input)

    @property
    def shows_reasoning(self) -> bool:
        """Whether a thinking model's thinking comes out as a reasoning item: not with effort 'none'."""
        return self.reasoning is None or self.reasoning.effort != "none"

    def template_kwargs(self) -> dict[str, Any] | None:
        """`enable_thinking` for the chat template where reasoning.effort is given (other templates ignore it)."""
        if self.reasoning is None or self.reasoning.effort is None:
            return None
        return {"enable_thinking": self.reasoning.effort != "none"}

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template receives them (none for tool_choice 'none')."""
        return [] if self.tool_choice == "none" else [tool.to_openai() for tool in self.tools]

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools a call is forced to: all of them for 'required', the named one; None: no call forced."""
        choice = self.tool_choice
        if choice == "required":
            return self.offered_tools()
        if isinstance(choice, FunctionChoice):
            return [tool.to_openai() for tool in self.tools if tool.name == choice.name]
        return None

    @property
    def parallel(self) -> bool:
        """Whether a forced call may be several calls: not for a named function, nor with parallel calls off."""
        return self.parallel_tool_calls and not isinstance(self.tool_choice, FunctionChoice)

    def structured_output(self) -> StructuredOutput | None:
        """text.format as the constraint the worker enforces (None for plain text)."""
        form = self.text.format if self.text else None
        if isinstance(form, JsonObjectFormat):
            return StructuredOutput("json_object", "", "text.format")
        if isinstance(form, JsonSchemaFormat):
            return StructuredOutput("json", json.dumps(form.json_schema), "text.format.schema")
        return None

    @property
    def stop_strings(self) -> list[str]:
        return []

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """OpenAI's defaults: temperature 1, top_p 1; no limit but the context unless max_output_tokens."""
        return SamplingParams(
            max_tokens=self.max_output_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            structured=self.structured_output(),
        )

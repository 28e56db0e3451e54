"""The Responses request body without a server: input items become the chat template's messages as chat completions
would send them, tools and tool_choice become chat's, text.format a structured output, and what cannot be served is
refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.errors import from_validation_errors
from app.responses_api.protocol import ResponsesRequest
from worker.messages import StructuredOutput

TOOL = {"type": "function", "name": "f", "description": "F", "parameters": {"type": "object"}, "strict": True}


def request(**body: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **body})


def refusal(**body: Any) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as refused:
        request(**body)
    error = from_validation_errors(refused.value.errors())
    return error.param, error.message


def test_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x": 1}', "id": "fc_1"},
        {"type": "function_call", "call_id": "call_2", "name": "f", "arguments": "not json"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "two"}]},
    ]
    assert request(instructions="You help.", input=items).template_messages() == [
        {"role": "system", "content": "You help."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "not json"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
    ]
    assert request().template_messages() == [{"role": "user", "content": "hi"}]


def test_tools_and_choices_are_chats() -> None:
    chat_tool = {
        "type": "function",
        "function": {"name": "f", "description": "F", "parameters": {"type": "object"}, "strict": True},
    }
    auto = request(tools=[TOOL])
    assert auto.offered_tools() == [chat_tool] and auto.forced_tools() is None and auto.parallel
    assert request(tools=[TOOL], tool_choice="none").offered_tools() == []
    assert request(tools=[TOOL], tool_choice="required").forced_tools() == [chat_tool]
    named = request(tools=[TOOL], tool_choice={"type": "function", "name": "f"})
    assert named.forced_tools() == [chat_tool] and not named.parallel


def test_text_format_is_a_structured_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    form = {"type": "json_schema", "name": "x", "schema": schema, "strict": True}
    assert request(text={"format": form}).structured_output() == StructuredOutput(
        "json", '{"type": "object", "properties": {"a": {"type": "integer"}}}', "text.format.schema"
    )
    assert request(text={"format": {"type": "json_object"}}).to_sampling_params(9).structured is not None
    assert request(text={"format": {"type": "text"}}).structured_output() is None
    params = request(max_output_tokens=7).to_sampling_params(100)
    assert (params.max_tokens, params.temperature, params.top_p) == (7, 1.0, 1.0)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"input": [{"type": "item_reference", "id": "rs_1"}]}, "input.0.type"),
        ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input.0.content.0.type"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name"),
        ({"tools": [TOOL, TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "tool_choice"),
        ({"input": [{"content": "no role, no type"}]}, "input.0"),
    ],
)
def test_what_cannot_be_served_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    assert refusal(**body)[0] == param


def test_no_ops_are_accepted() -> None:
    request(
        store=True, background=False, include=[], truncation="disabled", service_tier="auto", previous_response_id=None
    )

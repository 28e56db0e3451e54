"""Function tools through /v1/responses and the `openai` SDK, on a tiny model whose chat template teaches the Hermes
format: tool_choice required or a named function forces a function_call item whose arguments satisfy the schema,
streamed as function_call_arguments deltas; the call and its function_call_output go back in the next request;
tool_choice none offers no tools."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseFunctionToolCall

from tests.app.chat_server import NO_TOOLS_MODEL, TOOLS_MODEL
from tests.app.test_server_tools import TIME, WEATHER

pytestmark = pytest.mark.slow

TOOLS: Any = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER, "strict": True},
    {"type": "function", "name": "get_time", "description": "Time now", "parameters": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = "What is the weather in Paris?"
NAMED: Any = {"type": "function", "name": "get_weather"}


def create(client: openai.OpenAI, **kwargs: Any) -> Response:
    args: dict[str, Any] = {"model": TOOLS_MODEL, "input": ASK, "max_output_tokens": 200, "temperature": 0, **kwargs}
    return client.responses.create(**args)


def calls_of(response: Response) -> list[ResponseFunctionToolCall]:
    return [item for item in response.output if item.type == "function_call"]


@pytest.mark.parametrize(("tool_choice", "names"), [("required", set(SCHEMAS)), (NAMED, {"get_weather"})])
def test_a_forced_call_is_a_valid_function_call(client: openai.OpenAI, tool_choice: Any, names: set[str]) -> None:
    response = create(client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert response.status == "completed"
    [call] = calls_of(response)
    assert [item.type for item in response.output] == ["function_call"]
    assert call.id is not None and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name in names and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert response.model_dump(exclude_none=True)["tool_choice"] == tool_choice
    assert [tool.model_dump(exclude_none=True) for tool in response.tools] == TOOLS


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_streamed_call_is_the_non_streamed_one(client: openai.OpenAI, tool_choice: Any) -> None:
    whole = create(client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    kinds, arguments = [], ""
    args: dict[str, Any] = {"model": TOOLS_MODEL, "input": ASK, "max_output_tokens": 200, "temperature": 0}
    with client.responses.stream(**args, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                arguments += event.delta
            if event.type == "response.function_call_arguments.done":
                assert event.arguments == arguments
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert "response.output_text.delta" not in kinds and "response.function_call_arguments.delta" in kinds
    [expected], [got] = calls_of(whole), calls_of(final)
    assert (got.name, got.arguments) == (expected.name, expected.arguments) == (got.name, arguments)
    assert got.call_id.startswith("call_") and got.status == "completed"
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_function_call_output_is_answered(client: openai.OpenAI) -> None:
    first = create(client, tools=TOOLS, tool_choice=NAMED)
    [call] = calls_of(first)
    follow_up: Any = [
        {"role": "user", "content": ASK},
        *first.output,  # the SDK's own items, sent back as they came
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"},
    ]
    reply = create(client, input=follow_up, tools=TOOLS, max_output_tokens=8)
    assert reply.status in {"completed", "incomplete"} and reply.output
    assert reply.usage is not None and first.usage is not None
    assert reply.usage.input_tokens > first.usage.input_tokens
    assert reply.usage.output_tokens > 0
    # the same turn as plain dicts, with the output as input_text parts
    as_dicts: Any = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {
            "type": "function_call_output",
            "call_id": call.call_id,
            "output": [{"type": "input_text", "text": "18 C, sunny"}],
        },
    ]
    again = create(client, input=as_dicts, tools=TOOLS, max_output_tokens=8)
    assert again.usage is not None and again.usage.input_tokens == reply.usage.input_tokens
    assert again.output_text == reply.output_text


def test_tool_choice_none_offers_no_tools(client: openai.OpenAI) -> None:
    bare = create(client, max_output_tokens=1)
    offered = create(client, tools=TOOLS, max_output_tokens=1)
    none = create(client, tools=TOOLS, tool_choice="none", max_output_tokens=1)
    assert bare.usage is not None and offered.usage is not None and none.usage is not None
    assert none.usage.input_tokens == bare.usage.input_tokens < offered.usage.input_tokens


def test_tools_on_a_model_that_refuses_them_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, model=NO_TOOLS_MODEL, tools=TOOLS, max_output_tokens=2)
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "tools"

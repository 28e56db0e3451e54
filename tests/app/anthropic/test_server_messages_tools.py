"""Tool use through /v1/messages and the `anthropic` SDK, on a tiny model whose chat template teaches the Hermes format:
tool_choice any and tool force a tool_use block whose input satisfies the schema, streamed as input_json_delta; a
tool_result turn is accepted; auto parses a call the model writes; count_tokens counts the tools."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.app.anthropic.conftest import NO_TOOLS_MODEL, TOOLS_MODEL
from tests.app.test_server_tools import TIME, WEATHER

TOOLS: Any = [
    {"name": "get_weather", "description": "Weather now", "input_schema": WEATHER},
    {"name": "get_time", "description": "Time now", "input_schema": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    args: dict[str, Any] = {"model": TOOLS_MODEL, "messages": ASK, "max_tokens": 200, **kwargs}
    args["extra_body"] = {"temperature": 0, **args.get("extra_body", {})}  # the SDK no longer takes it by name
    return client.messages.create(**args)


def tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    return [block for block in message.content if block.type == "tool_use"]


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [({"type": "any"}, set(SCHEMAS)), ({"type": "tool", "name": "get_time"}, {"get_time"})],
)
def test_a_forced_call_is_a_valid_tool_use(client: anthropic.Anthropic, tool_choice: Any, names: set[str]) -> None:
    choice = {**tool_choice, "disable_parallel_tool_use": True} if tool_choice["type"] == "any" else tool_choice
    message = create(client, tools=TOOLS, tool_choice=choice)
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    [call] = tool_uses(message)
    assert call.id.startswith("toolu_") and call.name in names
    jsonschema.validate(call.input, SCHEMAS[call.name])


@pytest.mark.parametrize(
    "tool_choice", [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather"}]
)
def test_streamed_tool_use_is_the_non_streamed_one(client: anthropic.Anthropic, tool_choice: Any) -> None:
    whole = create(client, tools=TOOLS, tool_choice=tool_choice)
    kinds, partial = [], ""
    args: dict[str, Any] = {"model": TOOLS_MODEL, "messages": ASK, "max_tokens": 200, "extra_body": {"temperature": 0}}
    with client.messages.stream(**args, tools=TOOLS, tool_choice=tool_choice) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta":
                assert event.delta.type == "input_json_delta"
                partial += event.delta.partial_json
        final = stream.get_final_message()
    assert "input_json" in kinds and "text" not in kinds
    [expected], [got] = tool_uses(whole), tool_uses(final)
    assert (got.name, got.input) == (expected.name, expected.input) and json.loads(partial) == expected.input
    assert got.id.startswith("toolu_") and final.stop_reason == whole.stop_reason == "tool_use"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_tool_result_turn_is_answered(client: anthropic.Anthropic) -> None:
    first = create(client, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    [call] = tool_uses(first)
    messages: Any = [
        *ASK,
        {"role": "assistant", "content": first.content},  # the SDK's own blocks, sent back as they came
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 C, sunny"}]},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    reply = create(client, messages=messages, tools=TOOLS, max_tokens=8)
    assert reply.stop_reason in {"end_turn", "max_tokens", "tool_use"} and reply.usage.output_tokens > 0
    assert reply.usage.input_tokens > first.usage.input_tokens
    counted = client.messages.count_tokens(model=TOOLS_MODEL, messages=messages, tools=TOOLS)
    assert counted.input_tokens == reply.usage.input_tokens


def test_auto_parses_a_call_the_model_writes(client: anthropic.Anthropic) -> None:
    # The tiny model has random weights: a grammar (our extension) makes it write a Hermes call, as a trained one would.
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    body = {"guided_grammar": f"start: {json.dumps('Let me look. ' + written)}"}
    with pytest.raises(anthropic.BadRequestError):  # not an Anthropic field: refused, as chat refuses unknown ones
        create(client, tools=TOOLS, extra_body=body)


def test_count_tokens_counts_the_tools(client: anthropic.Anthropic) -> None:
    bare = client.messages.count_tokens(model=TOOLS_MODEL, messages=ASK)
    offered = client.messages.count_tokens(model=TOOLS_MODEL, messages=ASK, tools=TOOLS)
    none = client.messages.count_tokens(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "none"})
    assert none.input_tokens == bare.input_tokens < offered.input_tokens
    assert offered.input_tokens == create(client, tools=TOOLS, max_tokens=1).usage.input_tokens


def test_tools_on_a_model_that_refuses_them_are_refused(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        create(client, model=NO_TOOLS_MODEL, tools=TOOLS, max_tokens=2)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["message"].startswith("tools: ")

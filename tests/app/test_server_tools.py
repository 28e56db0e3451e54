"""Tool calling through the HTTP API and the official OpenAI client, with a tiny model whose chat template teaches
the Hermes `<tool_call>` format: tool_choice auto, required, a named function and none; streamed calls reassemble
into the non-streamed ones; tool results in the conversation render; bad tool requests get a 400. The same model
with a template that teaches no tools gets them in the generic prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You can call these tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 16}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def start_tools_server(tiny_tokenizer: PreTrainedTokenizerFast, tmp: Path) -> Server:
    """Models 'tiny-tools' (a Hermes template), 'tiny-plain' (a template that teaches no tools: the generic prompt)
    and 'tiny-none' (tools refused) over one tiny Llama."""
    (tmp / "hermes.jinja").write_text(HERMES_TEMPLATE)
    # The tiny tokenizer spends about a token per character: tool definitions need a longer context than 512.
    config = LlamaConfig(**{**tiny_config_kwargs(tiny_tokenizer), "max_position_embeddings": 4096})
    model_dir = save_tiny_model(LlamaForCausalLM, config, tiny_tokenizer, tmp / "tiny-llama-4k")
    common = {"source": str(model_dir), "dtype": "float32", "kv_cache_memory": "32MiB"}
    entries = [
        {"name": "tiny-tools", "chat_template": str(tmp / "hermes.jinja"), **common},
        {"name": "tiny-plain", **common},  # its template teaches no tools
        {"name": "tiny-none", "tool_parser": "none", **common},
    ]
    return start_server(write_registry(tmp / "models.yaml", entries), tmp)


@pytest.fixture(scope="module")
def server(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_tools_server(tiny_tokenizer, tmp_path_factory.mktemp("tools"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny-tools", "messages": ASK, "max_tokens": 200, "temperature": 0, **kwargs}
    return client.chat.completions.create(**args)


def streamed_calls(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    """Content, (name, arguments) per call and finish reason, reassembled from the stream's deltas."""
    content, finish = "", None
    calls: list[list[str]] = []
    for chunk in create(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index == len(calls):
                    assert delta.id and delta.function and delta.function.name
                    calls.append([delta.function.name, ""])
                calls[delta.index][1] += (delta.function and delta.function.arguments) or ""
            finish = choice.finish_reason or finish
    return content, [(name, arguments) for name, arguments in calls], finish


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_always_calls_a_tool_with_valid_arguments(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, set(SCHEMAS))


def test_parallel_calls_are_all_valid(client: openai.OpenAI) -> None:
    reply = create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7, max_tokens=300)
    choice = reply.choices[0]
    calls = choice.message.tool_calls
    if choice.finish_reason == "length":  # the random model may keep calling; the last call is then cut short
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls"
    check_calls(calls, set(SCHEMAS))


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_time"}}
    reply = create(client, tools=TOOLS, tool_choice=choice)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and reply.choices[0].finish_reason == "stop"  # as OpenAI finishes a named call
    check_calls(calls, {"get_time"})


@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
)
def test_streamed_calls_reassemble_into_the_non_streamed_ones(
    client: openai.OpenAI, tool_choice: Any, finish_reason: str
) -> None:
    args: dict[str, Any] = {"tools": TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": False}
    whole = create(client, **args).choices[0]
    content, calls, finish = streamed_calls(client, **args)
    expected = [(call.function.name, call.function.arguments) for call in whole.message.tool_calls]
    assert calls == expected and finish == whole.finish_reason == finish_reason and not content


def test_auto_parses_a_call_the_model_writes(client: openai.OpenAI) -> None:
    # The tiny model has random weights: a grammar makes it write a Hermes call, as a trained model would.
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    grammar = f"start: {json.dumps('Let me look. ' + written)}"
    reply = create(client, tools=TOOLS, tool_choice="auto", extra_body={"guided_grammar": grammar})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look. "
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}
    content, calls, finish = streamed_calls(
        client, tools=TOOLS, tool_choice="auto", extra_body={"guided_grammar": grammar}
    )
    assert content == "Let me look. " and calls == [(call.function.name, call.function.arguments)]
    assert finish == "tool_calls"


def test_auto_leaves_plain_text_alone(client: openai.OpenAI) -> None:
    text = "No call: <tool_ maybe {not json}"
    reply = create(client, tools=TOOLS, extra_body={"guided_grammar": f"start: {json.dumps(text)}"})
    assert reply.choices[0].message.content == text and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    content, calls, _ = streamed_calls(client, tools=TOOLS, extra_body={"guided_grammar": f"start: {json.dumps(text)}"})
    assert content == text and calls == []


def test_none_neither_offers_tools_nor_parses_calls(client: openai.OpenAI) -> None:
    written = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    body = {"guided_grammar": f"start: {json.dumps(written)}"}
    plain = create(client, extra_body=body)
    none = create(client, tools=TOOLS, tool_choice="none", extra_body=body)
    offered = create(client, tools=TOOLS, tool_choice="auto", extra_body=body)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens
    assert none.choices[0].message.content == written and none.choices[0].message.tool_calls is None
    assert offered.choices[0].message.tool_calls is not None


def test_tool_results_in_the_conversation_render(client: openai.OpenAI) -> None:
    first = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    messages: Any = [
        *ASK,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    reply = create(client, messages=messages, tools=TOOLS, max_tokens=8)
    assert reply.usage.prompt_tokens > create(client, tools=TOOLS, max_tokens=8).usage.prompt_tokens


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("tiny-tools", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ("tiny-tools", {"tools": None, "tool_choice": "required"}, "tool_choice"),
        ("tiny-tools", {"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ("tiny-tools", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ("tiny-tools", {"tool_choice": "required", "guided_regex": "x"}, "tool_choice"),
        ("tiny-none", {}, "tools"),
        ("tiny-tools", {"tool_choice": "required", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objekt"}}}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_tool_requests_get_a_400(client: openai.OpenAI, model: str, extra: dict[str, Any], param: str) -> None:
    body = {"tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4, extra_body=body)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param, error


def test_a_template_without_tools_gets_the_generic_prompt_and_forced_calls(client: openai.OpenAI) -> None:
    bare = create(client, model="tiny-plain", max_tokens=1)
    reply = create(client, model="tiny-plain", tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 200  # the tools' schemas are in the prompt
    message = reply.choices[0].message
    check_calls(message.tool_calls, {"get_weather", "get_time"})
    assert reply.choices[0].finish_reason == "tool_calls"
    call = message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    streamed = streamed_calls(
        client, model="tiny-plain", tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert streamed[1] == [(c.function.name, c.function.arguments) for c in message.tool_calls]

    turn: Any = [
        *ASK,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    answered = create(client, model="tiny-plain", messages=turn, tools=TOOLS, max_tokens=1)
    assert (
        answered.usage.prompt_tokens > create(client, model="tiny-plain", tools=TOOLS, max_tokens=1).usage.prompt_tokens
    )
    without_tools = create(client, model="tiny-plain", messages=turn, max_tokens=1)  # earlier calls still render
    assert without_tools.usage.prompt_tokens < answered.usage.prompt_tokens

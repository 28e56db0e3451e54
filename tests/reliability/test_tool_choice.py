"""A forced tool call is exactly what tool_choice asks for, against a real server whose tiny model's template teaches
the Hermes format: a named function is one call, whatever parallel_tool_calls says, finished with 'stop' as OpenAI
finishes it; 'required' with parallel_tool_calls false is one call too. The grammar ends after the call, so the
model can neither start a second one nor ramble on to max_tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from llguidance import LLMatcher, LLTokenizer
from transformers import PreTrainedTokenizerFast

from app.tool_calls import forced_call_grammar
from tests.app.test_server_tools import ASK, TOOLS, check_calls, create, start_tools_server, streamed_calls
from tests.server_harness import Server

MAX_TOKENS = 300  # room for several calls: a grammar that allowed a second one would show it
NAMED: Any = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def server(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_tools_server(tiny_tokenizer, tmp_path_factory.mktemp("tool-choice"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("parallel", [None, True, False], ids=["default", "parallel", "single"])
def test_a_named_function_is_one_call_finished_with_stop(client: openai.OpenAI, parallel: bool | None) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for seed in range(3):
        reply = create(client, tools=TOOLS, tool_choice=NAMED, max_tokens=MAX_TOKENS, temperature=1, seed=seed, **extra)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and not choice.message.content, choice
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, {"get_time"})
        assert reply.usage.completion_tokens < MAX_TOKENS  # it ended by itself, after the call


def test_a_streamed_named_call_is_one_call_finished_with_stop(client: openai.OpenAI) -> None:
    whole = create(client, tools=TOOLS, tool_choice=NAMED, max_tokens=MAX_TOKENS, temperature=1, seed=4)
    content, calls, finish = streamed_calls(
        client, tools=TOOLS, tool_choice=NAMED, max_tokens=MAX_TOKENS, temperature=1, seed=4
    )
    call = whole.choices[0].message.tool_calls[0]
    assert calls == [(call.function.name, call.function.arguments)] and finish == "stop" and not content


def test_required_without_parallel_calls_is_one_call_finished_with_tool_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = create(
            client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS,
            temperature=1, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        assert reply.usage.completion_tokens < MAX_TOKENS


def test_the_single_call_grammar_allows_only_the_end_after_the_call(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = LLTokenizer(tiny_tokenizer.backend_tokenizer.to_str(), eos_token=tiny_tokenizer.eos_token_id)
    grammar = forced_call_grammar("hermes", [TOOLS[1]], False, {})
    call = '<tool_call>\n{"name":"get_time","arguments":{"timezone":"UTC"}}\n</tool_call>'
    matcher = LLMatcher(tokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert matcher.consume_tokens(tokenizer.tokenize_bytes(call.encode())), matcher.get_error()
    assert matcher.is_accepting()
    allowed = int.from_bytes(matcher.compute_bitmask(), "little")
    assert allowed == 1 << tiny_tokenizer.eos_token_id  # no second call, no text: only the end


def test_a_request_after_the_calls_is_served(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-tools", messages=ASK, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")

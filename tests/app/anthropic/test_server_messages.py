"""POST /v1/messages and /v1/messages/count_tokens end to end, through the official `anthropic` SDK and raw HTTP: greedy
replies equal chat completions' for the same conversation, system as a string or blocks, stop sequences, max_tokens,
the stream's exact event order, count_tokens, and errors in Anthropic's shape (OpenAI's stay OpenAI's)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.app.anthropic.conftest import API_KEY, MODEL, TIMEOUT
from tests.app.chat_server import typed_events
from tests.server_harness import Server

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise geography teacher."
GREEDY = {"temperature": 0}  # the SDK's create no longer names temperature, top_p or top_k: sent as extra_body
ASK: Any = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# The documented order: message_start, then per block start, deltas, stop; then message_delta, message_stop.
EVENT_ORDER = re.compile(
    r"message_start (content_block_start (content_block_delta )+content_block_stop )*message_delta message_stop"
)


@pytest.fixture(scope="module")
def chat(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=TIMEOUT, headers={"x-api-key": API_KEY}) as c:
        yield c


def create(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    args: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 24, **kwargs}
    args["extra_body"] = {"temperature": 0, **args.get("extra_body", {})}  # the SDK no longer takes it by name
    return client.messages.create(**args)


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def raw_events(http: httpx.Client, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(payload["type"], payload) for payload in typed_events(http, "/v1/messages", body)]


# --- replies -------------------------------------------------------------------------------------------------------


def test_greedy_reply_equals_chat_completions(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    message = create(client, system=SYSTEM)
    expected = chat.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *ASK], max_tokens=24, temperature=0
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert text_of(message) == expected.choices[0].message.content
    assert expected.usage is not None
    assert message.usage.input_tokens == expected.usage.prompt_tokens
    assert message.usage.output_tokens == expected.usage.completion_tokens
    finish = {"stop": "end_turn", "length": "max_tokens"}[expected.choices[0].finish_reason]
    assert message.stop_reason == finish and message.stop_sequence is None


def test_system_as_blocks_is_the_system_string(client: anthropic.Anthropic) -> None:
    as_string = create(client, system=SYSTEM, max_tokens=8)
    half = len(SYSTEM) // 2
    blocks: Any = [
        {"type": "text", "text": SYSTEM[:half]},
        {"type": "text", "text": SYSTEM[half:], "cache_control": {"type": "ephemeral"}},
    ]
    joined = create(client, system=blocks, max_tokens=8)
    one_block = create(client, system=[{"type": "text", "text": SYSTEM}], max_tokens=8)
    assert text_of(one_block) == text_of(as_string)
    assert one_block.usage.input_tokens == as_string.usage.input_tokens
    assert joined.usage.input_tokens >= as_string.usage.input_tokens  # joined by a newline


def test_stop_sequence_is_named(client: anthropic.Anthropic) -> None:
    text = text_of(create(client))
    word = text.split()[2]  # a word the greedy reply writes, after its start
    message = create(client, stop_sequences=["@@never@@", word])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert text_of(message) == text[: text.index(word)]


def test_max_tokens_stops_the_reply(client: anthropic.Anthropic) -> None:
    message = create(client, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 3


def test_content_blocks_and_metadata_are_accepted(client: anthropic.Anthropic) -> None:
    blocks: Any = [{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"]}]}]
    message = create(client, messages=blocks, metadata={"user_id": "u-1"}, extra_headers={"anthropic-beta": "x"})
    assert text_of(message) == text_of(create(client))


# --- streaming -----------------------------------------------------------------------------------------------------


def test_stream_gives_the_same_message(client: anthropic.Anthropic) -> None:
    whole = create(client, system=SYSTEM)
    with client.messages.stream(model=MODEL, system=SYSTEM, messages=ASK, max_tokens=24, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole) == text_of(final)
    assert final.stop_reason == whole.stop_reason and final.stop_sequence is None
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_events_come_in_the_documented_order(client: anthropic.Anthropic, http: httpx.Client) -> None:
    stream = client.messages.create(model=MODEL, messages=ASK, max_tokens=24, stream=True, extra_body=GREEDY)
    kinds = [event.type for event in stream]
    assert EVENT_ORDER.fullmatch(" ".join(kinds)), kinds  # the SDK drops pings
    events = raw_events(http, {"model": MODEL, "messages": ASK, "max_tokens": 6, **GREEDY})
    names = [kind for kind, _ in events if kind != "ping"]
    assert EVENT_ORDER.fullmatch(" ".join(names)), names
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert [payload for kind, payload in events if kind != "ping"][1]["content_block"] == {"type": "text", "text": ""}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 6}


def test_streamed_stop_sequence(client: anthropic.Anthropic) -> None:
    text = text_of(create(client))
    word = text.split()[2]
    args: Any = {"model": MODEL, "messages": ASK, "max_tokens": 24, "extra_body": GREEDY}
    with client.messages.stream(**args, stop_sequences=[word]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word
    assert text_of(final) == text[: text.index(word)]


# --- count_tokens --------------------------------------------------------------------------------------------------


def test_count_tokens_is_the_prompt(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=ASK)
    assert counted.input_tokens == create(client, system=SYSTEM, max_tokens=2).usage.input_tokens


# --- errors --------------------------------------------------------------------------------------------------------


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}
    return dict(body["error"])


def test_missing_max_tokens_is_a_bad_request(client: anthropic.Anthropic, http: httpx.Client) -> None:
    response = http.post("/v1/messages", json={"model": MODEL, "messages": ASK})
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Missing required parameter: 'max_tokens'."},
    }
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=MODEL, messages=ASK, max_tokens=0)
    assert error_of(refused.value)["type"] == "invalid_request_error"
    assert "max_tokens" in error_of(refused.value)["message"]


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        create(client, model="claude-nonexistent")
    error = error_of(missing.value)
    assert error["type"] == "not_found_error" and "claude-nonexistent" in error["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-nonexistent", messages=ASK)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ([{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}], "messages.0.content.0"),
        ([{"type": "text", "text": "hi"}, {"type": "document", "source": {}}], "messages.0.content.1"),
    ],
)
def test_unservable_blocks_are_refused_by_name(client: anthropic.Anthropic, content: Any, field: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        create(client, messages=[{"role": "user", "content": content}])
    error = error_of(refused.value)
    assert error["type"] == "invalid_request_error" and error["message"].startswith(field), error
    assert "not supported" in error["message"]


def test_unknown_fields_and_prefill_are_refused(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as unknown:
        create(client, extra_body={"frequency_penalty": 1})
    assert "frequency_penalty" in error_of(unknown.value)["message"]
    prefill: Any = [*ASK, {"role": "assistant", "content": "The capital"}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        create(client, messages=prefill)
    assert error_of(refused.value)["message"].startswith("messages.1.role")


def test_api_key_in_x_api_key(server: Server) -> None:
    def sdk(key: str) -> anthropic.Anthropic:  # the key in x-api-key only, no Authorization header
        headers: Any = {"x-api-key": key, "Authorization": anthropic.omit}
        return anthropic.Anthropic(
            base_url=server.base_url, auth_token="unused", default_headers=headers, max_retries=0, timeout=TIMEOUT
        )

    with sdk("wrong") as wrong, pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model=MODEL, messages=ASK, max_tokens=2)
    error = error_of(refused.value)
    assert error["type"] == "authentication_error" and refused.value.status_code == 401
    with sdk(API_KEY) as right:
        assert right.messages.create(model=MODEL, messages=ASK, max_tokens=2).usage.output_tokens == 2
    # any route takes either header
    assert httpx.get(f"{server.base_url}/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_openai_routes_keep_openai_errors(chat: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat.chat.completions.create(model="nope", messages=ASK, max_tokens=2)
    body = missing.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body  # the SDK unwraps
    assert body["code"] == "model_not_found"
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json={}, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    assert refused.json()["error"]["code"] == "invalid_api_key"
    unauthorized = httpx.post(f"{server.base_url}/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert unauthorized.status_code == 401 and unauthorized.json()["type"] == "error"

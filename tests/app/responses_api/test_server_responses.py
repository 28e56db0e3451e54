"""POST /v1/responses end to end, through the official `openai` SDK and raw HTTP: greedy text equals chat
completions' for the same conversation, input as a string or items, max_output_tokens makes the response incomplete,
the stream's events in their documented order with sequence numbers, text.format constraints, and refusals (state,
unservable input) as 400s in OpenAI's shape."""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.app.chat_server import MODEL, TIMEOUT, typed_events
from tests.app.responses_api.conftest import API_KEY
from tests.server_harness import Server

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise geography teacher."
QUESTION = "What is the capital of France? Answer in one sentence."
# The documented order: the response starts; per item it is added, (its part added, text deltas, text done, part
# done) and done; the response completes (or is incomplete).
EVENT_ORDER = re.compile(
    r"response\.created response\.in_progress (response\.output_item\.added response\.content_part\.added "
    r"(response\.output_text\.delta )+response\.output_text\.done response\.content_part\.done "
    r"response\.output_item\.done )+response\.(completed|incomplete)"
)
# The SDK's model of each event type, to check every event against (its union is picked by the SDK, not pydantic).
EVENTS = {
    typing.get_args(model.model_fields["type"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
CITY: Any = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=TIMEOUT, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def create(client: openai.OpenAI, **kwargs: Any) -> Response:
    args: dict[str, Any] = {"model": MODEL, "input": QUESTION, "max_output_tokens": 24, "temperature": 0, **kwargs}
    return client.responses.create(**args)


def raw_events(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream's events (see `typed_events`), each an event the SDK knows, numbered from 0 in order."""
    events = typed_events(http, "/v1/responses", body)
    for event in events:
        EVENTS[event["type"]].model_validate(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


# --- responses ------------------------------------------------------------------------------------------------------


def test_greedy_text_equals_chat_completions(client: openai.OpenAI, http: httpx.Client) -> None:
    response = create(client, instructions=SYSTEM, metadata={"run": "1"}, user="u-1", store=True)
    expected = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert response.output_text == part.text == expected.choices[0].message.content
    finish = expected.choices[0].finish_reason
    assert response.status == message.status == {"stop": "completed", "length": "incomplete"}[finish]
    assert expected.usage is not None and response.usage is not None
    assert response.usage.input_tokens == expected.usage.prompt_tokens
    assert response.usage.output_tokens == expected.usage.completion_tokens
    assert response.usage.total_tokens == expected.usage.total_tokens
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    # the request's settings are echoed; nothing is stored
    assert (response.instructions, response.max_output_tokens, response.temperature, response.top_p) == (
        SYSTEM,
        24,
        0,
        1,
    )
    assert response.metadata == {"run": "1"} and response.user == "u-1"
    assert response.previous_response_id is None and response.error is None
    assert response.tools == [] and response.tool_choice == "auto" and response.parallel_tool_calls is True
    assert response.text is not None and response.text.format is not None and response.text.format.type == "text"
    raw = http.post("/v1/responses", json={"model": MODEL, "input": QUESTION, "max_output_tokens": 2}).json()
    Response.model_validate(raw)
    assert (
        raw["store"] is False
        and raw["error"] is None
        and raw["previous_response_id"] is None
        and raw["incomplete_details"] is not None
    )


def test_input_items_are_the_string_input(client: openai.OpenAI) -> None:
    plain = create(client, instructions=SYSTEM)
    items: Any = [
        {"type": "message", "role": "developer", "content": SYSTEM},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    assert create(client, input=items).output_text == plain.output_text
    history: Any = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [{"type": "output_text", "text": plain.output_text, "annotations": []}]},
        {"role": "user", "content": "And of Italy?"},
    ]
    followed = create(client, input=history, instructions=SYSTEM, max_output_tokens=4)
    assert followed.usage is not None and plain.usage is not None
    assert followed.usage.input_tokens > plain.usage.input_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = create(client, max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 3


# --- streaming ------------------------------------------------------------------------------------------------------


def test_stream_gives_the_same_response(client: openai.OpenAI) -> None:
    whole = create(client, instructions=SYSTEM, max_output_tokens=64)
    assert whole.status == "completed"  # SmolLM2 ends its sentence well before
    kinds, pieces = [], []
    with client.responses.stream(
        model=MODEL, input=QUESTION, instructions=SYSTEM, max_output_tokens=64, temperature=0
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                pieces.append(event.delta)
        final = stream.get_final_response()
    assert EVENT_ORDER.fullmatch(" ".join(kinds)), kinds
    assert len(pieces) > 1 and "".join(pieces) == whole.output_text == final.output_text
    assert final.status == "completed" and final.id.startswith("resp_") and final.output[0].type == "message"
    assert final.output[0].status == "completed"
    assert final.usage is not None and whole.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )


def test_stream_events_carry_the_documented_fields(http: httpx.Client) -> None:
    events = raw_events(http, {"model": MODEL, "input": QUESTION, "max_output_tokens": 6, "temperature": 0})
    kinds = [event["type"] for event in events]
    assert EVENT_ORDER.fullmatch(" ".join(kinds)) and kinds[-1] == "response.incomplete", kinds
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    added, part = events[2], events[3]
    item_id = added["item"]["id"]
    assert added["item"] == {
        "type": "message",
        "id": item_id,
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert part["part"] == {"type": "output_text", "text": "", "annotations": []}
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert all(
        (d["item_id"], d["output_index"], d["content_index"], d["logprobs"]) == (item_id, 0, 0, []) for d in deltas
    )
    text = "".join(d["delta"] for d in deltas)
    assert events[-4]["text"] == text and events[-3]["part"]["text"] == text
    assert events[-2]["item"]["status"] == "incomplete" and events[-2]["item"]["content"][0]["text"] == text
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"] == [events[-2]["item"]] and final["usage"]["output_tokens"] == 6
    assert final["id"] == created["id"]


# --- structured outputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_format_holds(client: openai.OpenAI, stream: bool) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "place", "schema": CITY, "strict": True}}
    args: dict[str, Any] = {"model": MODEL, "input": QUESTION, "max_output_tokens": 96, "temperature": 0, "text": text}
    if stream:
        with client.responses.stream(**args) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(**args)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_json_object_format(client: openai.OpenAI) -> None:
    response = create(
        client, input=f"{QUESTION} Reply in JSON.", max_output_tokens=64, text={"format": {"type": "json_object"}}
    )
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.output_text.lstrip().startswith("{")


# --- refusals -------------------------------------------------------------------------------------------------------


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body  # the SDK unwraps {"error": ...}
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return dict(body)


def test_previous_response_id_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, previous_response_id="resp_123")
    error = error_of(refused.value)
    assert error["param"] == "previous_response_id" and error["type"] == "invalid_request_error"
    assert "previous_response_id" in error["message"] and "stores no responses" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}]},
            "input.0.content.0.type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools.0.type"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"input": []}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 1_000_000}, "input"),
    ],
)
def test_unservable_requests_are_refused_by_name(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = http.post("/v1/responses", json={"model": MODEL, "input": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unknown_model_and_fields(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        create(client, model="gpt-nonexistent")
    assert error_of(missing.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unknown:
        create(client, extra_body={"frequency_penalty": 1})
    assert error_of(unknown.value)["param"] == "frequency_penalty"


def test_api_key_is_required(server: Server) -> None:
    refused = httpx.post(f"{server.base_url}/v1/responses", json={"model": MODEL, "input": "hi"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

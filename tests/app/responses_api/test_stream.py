"""`ResponseEvents` without a server: a reply's pieces become the documented events, each one the SDK's model of its
type accepts, numbered in order; text then a call, an empty reply, and a failure after the start."""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace
from typing import Any

from openai.types.responses import ResponseStreamEvent

from app.errors import APIError
from app.responses_api.create import _in_progress
from app.responses_api.protocol import ResponsesRequest
from app.responses_api.stream import ResponseEvents

EVENTS = {
    typing.get_args(model.model_fields["type"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
TOOLS = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]


def events_of(sse: str) -> list[dict[str, Any]]:
    events = []
    for chunk in sse.removesuffix("\n\n").split("\n\n"):
        kind, data = chunk.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        EVENTS[payload["type"]].model_validate(payload)
        events.append(payload)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def run(body: dict[str, Any], pieces: list[str], finish_reason: str, tool_format: Any = None) -> list[dict[str, Any]]:
    events = ResponseEvents(_in_progress(ResponsesRequest.model_validate(body), "m"), tool_format)
    sse = events.start() + "".join(events.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces))
    choice = SimpleNamespace(finish_reason=finish_reason)
    gen: Any = SimpleNamespace(choices=[choice], num_prompt_tokens=5, num_completion_tokens=3, num_cached_tokens=2)
    return events_of(sse + events.finish(gen))


def names(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"].removeprefix("response.") for event in events]


def test_text_then_a_call() -> None:
    call = '<tool_call>\n{"name": "f", "arg', 'uments": {"a": 1}}\n</tool_call>'
    events = run({"model": "m", "input": "hi", "tools": TOOLS}, ["Let me ", "see. ", *call], "stop", "hermes")
    assert names(events) == [
        "created",
        "in_progress",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
        "completed",
    ]
    final = events[-1]["response"]
    message, function_call = final["output"]
    assert message["content"][0]["text"] == "Let me see. " and message["status"] == "completed"
    assert function_call["name"] == "f" and json.loads(function_call["arguments"]) == {"a": 1}
    assert function_call["call_id"].startswith("call_") and function_call["id"] == events[9]["item"]["id"]
    assert final["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 8,
    }


def test_an_empty_reply_cut_short_is_an_empty_incomplete_message() -> None:
    events = run({"model": "m", "input": "hi", "max_output_tokens": 1}, [], "length")
    assert names(events)[-5:] == [
        "content_part.added",
        "output_text.done",
        "content_part.done",
        "output_item.done",
        "incomplete",
    ]
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["output"][0]["content"][0]["text"] == ""


def test_a_failure_after_the_start_is_response_failed() -> None:
    events = ResponseEvents(_in_progress(ResponsesRequest.model_validate({"model": "m", "input": "hi"}), "m"), None)
    sse = events.start() + events.feed("Hello", final=False)
    sse += events.fail(APIError(408, "the request timed out", type="timeout_error", code="timeout"))
    failed = events_of(sse)[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the request timed out"}
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hello"  # what was sent before the failure


def test_thinking_is_a_reasoning_item_before_the_message() -> None:
    """The thinking (the prompt opened it) is split off as chat completions split it, whatever the pieces; each event
    is one the SDK's models accept, and the thinking's tokens are the usage's reasoning_tokens."""
    pieces = ["Let me ", "think.</th", "ink>\n\nHi", " there"]
    body = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    events = ResponseEvents(_in_progress(body, "m"), None, thinking=True)
    sse = events.start() + "".join(events.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces))
    text = "".join(pieces)
    offsets = [0, 4, 7, 13, 21, 25]  # characters before each of six tokens; the fourth is `</think>`
    detok = SimpleNamespace(text=text, token_offsets=offsets)
    choice = SimpleNamespace(finish_reason="stop", detok=detok, num_tokens=6)
    gen: Any = SimpleNamespace(choices=[choice], num_prompt_tokens=5, num_completion_tokens=6, num_cached_tokens=0)
    out = events_of(sse + events.finish(gen))
    assert names(out) == [
        "created",
        "in_progress",
        "output_item.added",
        "content_part.added",
        "reasoning_text.delta",
        "reasoning_text.delta",
        "reasoning_text.done",
        "content_part.done",
        "output_item.done",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
        "completed",
    ]
    assert out[3]["part"] == {"type": "reasoning_text", "text": ""}
    reasoning, message = out[-1]["response"]["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert message["content"][0]["text"] == "Hi there"
    assert out[-1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    shown = ResponseEvents(_in_progress(body, "m"), None, thinking=True, show_thinking=False)
    hidden = events_of(shown.start() + shown.feed(text, final=True) + shown.finish(gen))
    assert [item["type"] for item in hidden[-1]["response"]["output"]] == ["message"]

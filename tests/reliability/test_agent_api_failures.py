"""Overload and failure on the Messages and Responses APIs, each in its own API's shape: a model with no room
answers 429 with Retry-After (Anthropic's rate_limit_error, OpenAI's rate_limit_exceeded), and a stream whose step
fails after it started ends with the API's own failure event (Anthropic's `error`, the Responses API's
`response.failed`) instead of being cut off."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import faults

MODEL = "tiny"
POISON = "Z"  # a character the chat template never writes: a prompt holding it fails its step
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(
    tiny_llama_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("agent-apis")
    (poison,) = tiny_tokenizer(POISON, add_special_tokens=False)["input_ids"]
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir, MODEL, threads=1)])
    # 20 ms more a step: a 100-token stream holds the one slot for over 2 s however fast the machine is
    env = {faults.ENV: f"slow:20,raise:{poison}"}
    args = ("--max-num-seqs", "1", "--max-waiting-requests", "0")
    server = start_server(registry, tmp, *args, env=env, ready_timeout=120)
    yield server
    assert server.stop() == 0


def sse(response: httpx.Response) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each event of a stream."""
    events = []
    for block in response.read().decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in lines:
            events.append((lines.get("event"), json.loads(lines["data"])))
    return events


MESSAGES: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES: dict[str, Any] = {"model": MODEL, "max_output_tokens": 4, "input": "hi"}


def test_a_full_model_answers_429_in_each_apis_shape(server: Server) -> None:
    started = threading.Event()

    def occupy() -> None:
        body = {"model": MODEL, "prompt": "hold", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=TIMEOUT) as response:
            for _ in response.iter_lines():
                started.set()

    holder = threading.Thread(target=occupy)
    holder.start()
    try:
        assert started.wait(TIMEOUT)
        messages = httpx.post(f"{server.base_url}/v1/messages", json=MESSAGES, timeout=TIMEOUT)
        responses = httpx.post(f"{server.base_url}/v1/responses", json=RESPONSES, timeout=TIMEOUT)
    finally:
        holder.join(TIMEOUT)
    assert messages.status_code == 429 and int(messages.headers["retry-after"]) >= 1, messages.text
    body = messages.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    assert responses.status_code == 429 and int(responses.headers["retry-after"]) >= 1, responses.text
    assert responses.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_messages_stream_that_fails_ends_with_an_error_event(server: Server) -> None:
    body = {**MESSAGES, "stream": True, "messages": [{"role": "user", "content": f"hi {POISON}"}]}
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = sse(response)
    assert events[0][0] == "message_start" and events[-1][0] == "error", events
    error = events[-1][1]
    assert error["type"] == "error" and error["error"]["type"] == "api_error" and error["error"]["message"]
    assert httpx.post(f"{server.base_url}/v1/messages", json=MESSAGES, timeout=TIMEOUT).status_code == 200


def test_a_responses_stream_that_fails_ends_with_response_failed(server: Server) -> None:
    body = {**RESPONSES, "stream": True, "input": f"hi {POISON}"}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = sse(response)
    assert events[0][0] == "response.created" and events[-1][0] == "response.failed", events
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert httpx.post(f"{server.base_url}/v1/responses", json=RESPONSES, timeout=TIMEOUT).status_code == 200

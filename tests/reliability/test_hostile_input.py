"""Input built to break the server, against a real `tokenmill serve`: lone surrogates in any string of a body, bodies
the JSON parser refuses. Each gets a 400 (or 415) in OpenAI's shape with a string code; the server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile-input")
    server = start_server(write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)]), tmp)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(client: httpx.Client) -> Iterator[None]:
    yield
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def post_raw(client: httpx.Client, path: str, body: str | bytes, content_type: str = "application/json") -> Any:
    return client.post(path, content=body, headers={"content-type": content_type})


def error_of(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    """The OpenAI error body, with exactly this status, code and param; returns the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), error
    message: str = error["message"]
    return message


# --- lone surrogates ---------------------------------------------------------------------------------------------

LONE = "<lone>"  # replaced in the raw body by a lone surrogate's JSON escape
USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": LONE}}]}


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 2, "messages": list(messages), **fields}


SURROGATES = [
    # (id, path, body, param)
    ("chat-content", "/v1/chat/completions", chat({"role": "user", "content": LONE}), "messages.0.content"),
    ("chat-content-part", "/v1/chat/completions", chat({"role": "user", "content": [{"type": "text", "text": LONE}]}),
     "messages.0.content.0.text"),
    ("message-name", "/v1/chat/completions", chat({**USER, "name": LONE}), "messages.0.name"),
    ("tool-arguments", "/v1/chat/completions", chat(USER, CALL), "messages.1.tool_calls.0.function.arguments"),
    ("tool-description", "/v1/chat/completions",
     chat(USER, tools=[{"type": "function", "function": {"name": "f", "description": LONE}}]),
     "tools.0.function.description"),
    ("stop", "/v1/chat/completions", chat(USER, stop=[LONE]), "stop.0"),
    ("schema-key", "/v1/chat/completions", chat(USER, guided_json={LONE: 1}), "guided_json"),
    ("model", "/v1/chat/completions", chat(USER, model=LONE), "model"),
    ("prompt", "/v1/completions", {"model": "tiny", "prompt": LONE}, "prompt"),
    ("prompt-list", "/v1/completions", {"model": "tiny", "prompt": ["ok", LONE]}, "prompt.1"),
    ("completions-model", "/v1/completions", {"model": LONE, "prompt": "hi"}, "model"),
    ("tokenize", "/tokenize", {"model": "tiny", "prompt": LONE}, "prompt"),
    ("tokenize-model", "/tokenize", {"model": LONE, "prompt": "hi"}, "model"),
    ("detokenize-model", "/detokenize", {"model": LONE, "tokens": [1]}, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in SURROGATES], ids=[c[0] for c in SURROGATES])
def test_a_lone_surrogate_anywhere_is_400(client: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    raw = json.dumps(body).replace(LONE, "a\\ud800b")
    message = error_of(post_raw(client, path, raw), 400, "invalid_unicode", param)
    assert "surrogate" in message and param in message


def test_a_surrogate_sent_as_utf8_bytes_is_400_too(client: httpx.Client) -> None:
    # Python's json module decodes bytes with 'surrogatepass': an encoded surrogate arrives as one, like an escape.
    body = b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}'
    error_of(post_raw(client, "/v1/completions", body), 400, "invalid_unicode", "prompt")


def test_paired_surrogates_are_text(client: httpx.Client) -> None:
    response = post_raw(client, "/tokenize", '{"model": "tiny", "prompt": "\\ud83d\\ude00"}')
    assert response.status_code == 200, response.text
    emoji = client.post("/tokenize", json={"model": "tiny", "prompt": "😀"})
    assert response.json()["tokens"] == emoji.json()["tokens"]


# --- bodies the parser refuses (invalid UTF-8 and deep nesting: test_bad_input) ---------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_without_a_json_content_type_is_415_saying_so(client: httpx.Client, content_type: str | None) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/completions", content=body, headers=headers)  # httpx adds no type of its own
    message = error_of(response, 415, "unsupported_media_type", None)
    assert "Content-Type: application/json" in message and (content_type or "no Content-Type") in message


def test_a_json_content_type_with_parameters_is_json(client: httpx.Client) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert post_raw(client, "/v1/completions", body, "application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize(
    ("prompt", "words"),
    [("", "empty"), ([1, 2, 100_000], "outside the vocabulary")],
    ids=["empty-prompt", "token-outside-vocab"],
)
def test_bad_prompts_have_a_code(client: httpx.Client, prompt: Any, words: str) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert words in error_of(response, 400, "invalid_value", "prompt")

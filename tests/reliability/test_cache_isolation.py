"""Tenants who must not share prefix cache: requests with different `cache_salt` never hit each other's blocks, so
neither is served another's KV nor learns from `cached_tokens` that another sent the same prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker.messages import MAX_CACHE_SALT_CHARS


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("cache-isolation")
    server: Server = start_server(write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)]), tmp)
    with server.client(timeout=60) as client:
        yield client
    assert server.stop() == 0


def prompt(topic: str) -> str:
    """A prompt of several full KV blocks, its own for each test, as are the salts (the server's cache outlives a test,
    and all chats start with the same template tokens)."""
    return f"A long shared system prompt about {topic}, which every request of a tenant starts with. " * 4


def chat_cached(client: httpx.Client, text: str, **extra: Any) -> int:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] >= 64
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def completion_cached(client: httpx.Client, text: str, **extra: Any) -> int:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_chat_requests_of_different_salts_share_no_cache(client: httpx.Client) -> None:
    text = prompt("tides")
    assert chat_cached(client, text, cache_salt="tenant-a") == 0
    assert chat_cached(client, text, cache_salt="tenant-b") == 0  # same prompt, another tenant: nothing shared
    assert chat_cached(client, text, cache_salt="tenant-a") > 0  # the same tenant again: its own blocks hit
    assert chat_cached(client, text, cache_salt="tenant-b") > 0


def test_unsalted_requests_share_no_cache_with_salted_ones(client: httpx.Client) -> None:
    text = prompt("glaciers")
    assert completion_cached(client, text) == 0
    assert completion_cached(client, text, cache_salt="tenant-c") == 0
    assert completion_cached(client, text) > 0
    assert completion_cached(client, text, cache_salt="tenant-c") > 0


def test_completions_of_different_salts_share_no_cache(client: httpx.Client) -> None:
    text = prompt("volcanoes")
    assert completion_cached(client, text, cache_salt="tenant-d") == 0
    assert completion_cached(client, text, cache_salt="tenant-e") == 0
    assert completion_cached(client, text, cache_salt="tenant-d") > 0


# a lone surrogate is no text: it could not be hashed (nor sent to the worker) as UTF-8
@pytest.mark.parametrize("salt", ["", 7, ["a"], "s" * (MAX_CACHE_SALT_CHARS + 1), "\ud800"])
def test_a_bad_salt_is_refused(client: httpx.Client, salt: object) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        content = json.dumps({"model": "tiny", "max_tokens": 2, "cache_salt": salt, **body})  # \ud800 escaped
        response = client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"
        assert isinstance(error["code"], str)

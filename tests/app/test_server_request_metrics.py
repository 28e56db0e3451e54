"""Per-request timing (`return_metrics`, or `--request-metrics` for every reply) through a real server on a tiny
model: the numbers agree with the usage, with each other and with the prefix cache, and come in a stream's last
chunk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry

TIMEOUT = 120.0
PROMPT = "one two three four five six seven eight nine ten " * 8  # several KV blocks: a second send hits the cache


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("request-metrics")
    server = start_server(write_registry(directory / "models.yaml", [model_entry(tiny_llama_dir)]), directory)
    yield server
    assert server.stop() == 0


def post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}{path}", json={"model": "tiny", "temperature": 0, **body}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def check(metrics: dict[str, Any], usage: dict[str, Any]) -> None:
    assert metrics["decode_tokens"] == usage["completion_tokens"]
    assert metrics["prefill_tokens"] + metrics["cached_tokens"] == usage["prompt_tokens"]
    assert metrics["cached_tokens"] == (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert 0 <= metrics["queue_time_ms"] <= metrics["time_to_first_token_ms"] <= metrics["e2e_ms"]
    assert metrics["mean_inter_token_ms"] > 0
    assert metrics["tokens_per_second"] == pytest.approx(1000 / metrics["mean_inter_token_ms"])
    gaps = metrics["mean_inter_token_ms"] * (metrics["decode_tokens"] - 1)
    assert metrics["time_to_first_token_ms"] + gaps == pytest.approx(metrics["e2e_ms"], rel=0.05)


def test_a_reply_carries_its_timing_only_when_asked(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "ignore_eos": True}
    assert "metrics" not in post(server, "/v1/chat/completions", body)
    reply = post(server, "/v1/chat/completions", {**body, "return_metrics": True})
    check(reply["metrics"], reply["usage"])
    assert reply["metrics"]["decode_tokens"] == 12


def test_a_second_send_of_a_prompt_counts_its_cached_tokens(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "return_metrics": True, "cache_salt": "metrics"}
    first, second = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    check(first["metrics"], first["usage"])
    check(second["metrics"], second["usage"])
    assert second["metrics"]["cached_tokens"] > 0 and first["metrics"]["cached_tokens"] == 0
    assert second["metrics"]["prefill_tokens"] < first["metrics"]["prefill_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_ends_with_the_timing_in_its_usage_chunk(server: Server, path: str) -> None:
    field = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    body = {"model": "tiny", **field, "max_tokens": 6, "ignore_eos": True, "stream": True, "return_metrics": True}
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, timeout=TIMEOUT) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6  # no include_usage needed
    check(last["metrics"], last["usage"])
    assert all("metrics" not in json.loads(event) for event in events[:-2])


def test_scoring_without_generating_has_no_first_token(server: Server) -> None:
    reply = post(server, "/v1/completions", {"prompt": "a b c", "max_tokens": 0, "echo": True, "return_metrics": True})
    metrics = reply["metrics"]
    assert metrics["decode_tokens"] == 0 and metrics["time_to_first_token_ms"] is None
    assert metrics["mean_inter_token_ms"] is None and metrics["tokens_per_second"] is None
    assert metrics["prefill_tokens"] == reply["usage"]["prompt_tokens"]


def test_the_server_flag_times_every_reply(tiny_llama_dir: Path, tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp_path, "--request-metrics")
    try:
        reply = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        check(reply["metrics"], reply["usage"])
    finally:
        assert server.stop() == 0

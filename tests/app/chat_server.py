"""A real `tokenmill serve` for the tests of the chat-shaped APIs beside chat completions (Anthropic's Messages,
OpenAI's Responses), started with an API key: SmolLM2 in fp32 (greedy decoding is exact, so replies can be compared
with chat completions') a tiny random Llama whose chat template teaches the Hermes tool-call format, and the same Llama
with tools refused (tool_parser: none)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.app.test_server_tools import HERMES_TEMPLATE
from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

MODEL = "smollm2"
TOOLS_MODEL = "tiny-tools"
NO_TOOLS_MODEL = "tiny-toolless"  # models.yaml refuses tools for it (tool_parser: none)
TIMEOUT = 120.0


def chat_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast, api_key: str
) -> Iterator[Server]:
    """The server, for a fixture to yield from; it must stop cleanly."""
    directory = tmp_path_factory.mktemp("server-chat")
    (directory / "hermes.jinja").write_text(HERMES_TEMPLATE)
    # The tiny tokenizer spends about a token per character: tool definitions need a longer context than 512.
    config = LlamaConfig(**{**tiny_config_kwargs(tiny_tokenizer), "max_position_embeddings": 4096})
    tiny_dir = save_tiny_model(LlamaForCausalLM, config, tiny_tokenizer, directory / "tiny-llama-4k")
    common = {"dtype": "float32", "device": "cpu"}
    registry = write_registry(
        directory / "models.yaml",
        [
            {"name": MODEL, "source": str(smollm2_dir), **common, "kv_cache_memory": "256MiB"},
            {
                "name": TOOLS_MODEL,
                "source": str(tiny_dir),
                "chat_template": str(directory / "hermes.jinja"),
                **common,
                "kv_cache_memory": "32MiB",
            },
            {
                "name": NO_TOOLS_MODEL,
                "source": str(tiny_dir),
                "tool_parser": "none",
                **common,
                "kv_cache_memory": "8MiB",
            },
        ],
    )
    server = start_server(registry, directory, "--api-key", api_key)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]


def typed_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSE events of a streamed request, checked byte for byte: `event: <type>` then `data: <json>` whose type is
    the same, and no `[DONE]` (keep-alive comments are left out)."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        raw = response.read().decode()
        assert response.status_code == 200, raw
        assert response.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = []
    for chunk in raw.removesuffix("\n\n").split("\n\n"):
        if chunk.startswith(":"):
            continue
        kind, data = chunk.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), chunk
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind.removeprefix("event: ")
        events.append(payload)
    return events

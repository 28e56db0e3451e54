"""A real `tokenmill serve` for the tests of the chat-shaped APIs beside chat completions (Anthropic's Messages,
OpenAI's Responses), started with an API key: SmolLM2 in fp32 (greedy decoding is exact, so replies can be compared
with chat completions') and a tiny random Llama whose chat template teaches the Hermes tool-call format (tools need
one; SmolLM2's template has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.app.test_server_tools import HERMES_TEMPLATE
from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

MODEL = "smollm2"
TOOLS_MODEL = "tiny-tools"
TIMEOUT = 120.0


def start_chat_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast, api_key: str
) -> Server:
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
        ],
    )
    return start_server(registry, directory, "--api-key", api_key)

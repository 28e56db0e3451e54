"""One real `tokenmill serve` for the Messages API tests, started with an API key: SmolLM2 in fp32 (greedy decoding is
exact, so its replies can be compared with chat completions') and a tiny random Llama whose chat template teaches the
Hermes tool-call format (tools need one; SmolLM2's template has none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.app.test_server_tools import HERMES_TEMPLATE
from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

API_KEY = "sk-test-messages"
MODEL = "smollm2"
TOOLS_MODEL = "tiny-tools"
TIMEOUT = 120.0


@pytest.fixture(scope="package")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("server-anthropic")
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
    server = start_server(registry, directory, "--api-key", API_KEY)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="package")
def client(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT) as c:
        yield c

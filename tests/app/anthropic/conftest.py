"""One real `tokenmill serve` for the Messages API tests (see tests.app.chat_server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from transformers import PreTrainedTokenizerFast

from tests.app.chat_server import MODEL, NO_TOOLS_MODEL, TIMEOUT, TOOLS_MODEL, chat_server
from tests.server_harness import Server

API_KEY = "sk-test-messages"
__all__ = ["API_KEY", "MODEL", "NO_TOOLS_MODEL", "TIMEOUT", "TOOLS_MODEL"]


@pytest.fixture(scope="package")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> Iterator[Server]:
    yield from chat_server(tmp_path_factory, smollm2_dir, tiny_tokenizer, API_KEY)


@pytest.fixture(scope="package")
def client(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT) as c:
        yield c

"""SSE keep-alive comments: none by default (OpenAI sends none, and some clients' parsers fail on them), and with
`--keepalive-seconds` a comment on a stream left silent that long, e.g. while a long step computes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import faults

SLOW = 9  # a prompt holding this token id makes its step compute for 1.5 s


@pytest.fixture(scope="module", params=[None, "0.3"], ids=["default", "keepalive"])
def served(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, bool]]:
    tmp = tmp_path_factory.mktemp("keepalive")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    flags = ("--keepalive-seconds", request.param) if request.param else ()
    server = start_server(registry, tmp, *flags, env={faults.ENV: f"busy:{SLOW}:1500"})
    yield server, request.param is not None
    assert server.stop() == 0


def test_comments_only_when_asked_for(served: tuple[Server, bool]) -> None:
    server, keepalive = served
    body = {"model": "tiny", "prompt": [5, SLOW, 6], "max_tokens": 3, "stream": True, "temperature": 0}
    with server.client(timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) >= 3
    if keepalive:
        assert comments and all(line == ": keep-alive" for line in comments)
    else:
        assert comments == []

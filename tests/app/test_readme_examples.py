"""README's curl and OpenAI SDK examples, run as written against a real server serving the default registry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import MINILM_SOURCE
from tests.server_harness import REPO, Server, start_server, write_registry

pytestmark = pytest.mark.slow

EXAMPLE = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.DOTALL)


def examples() -> dict[str, str]:
    return {m["name"]: m["code"] for m in EXAMPLE.finditer((REPO / "README.md").read_text())}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("logs")
    server = start_server(REPO / "models.yaml", logs, "--kv-cache-memory", "256MiB")
    yield server
    assert server.stop() == 0


def run_example(code: str, server: Server, shell: list[str]) -> str:
    code = code.replace("http://127.0.0.1:8000", server.base_url)
    result = subprocess.run([*shell, code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_has_the_examples() -> None:
    names = {"curl-chat", "curl-stream", "curl-completions", "python-sdk", "curl-json-schema", "python-structured"}
    names |= {"curl-messages", "python-anthropic", "curl-responses", "python-responses", "curl-rag", "curl-score"}
    assert names <= examples().keys()


def test_curl_chat(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-chat"], server, ["bash", "-c"]))
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] > 0


def test_curl_stream(server: Server) -> None:
    out = run_example(examples()["curl-stream"], server, ["bash", "-c"])
    events = [line for line in out.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text) > 10


def test_curl_completions(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-completions"], server, ["bash", "-c"]))
    choice = reply["choices"][0]
    assert reply["object"] == "text_completion"
    assert "." not in choice["text"]


def test_python_sdk(server: Server) -> None:
    out = run_example(examples()["python-sdk"], server, [sys.executable, "-c"])
    reply, _, stream = out.partition("\nstream: ")  # the model's text may hold newlines of its own
    assert reply.startswith("reply: ") and reply.removeprefix("reply: ").strip()
    assert stream.strip()


def test_curl_score(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-score"], server, ["bash", "-c"]))
    choice = reply["choices"][0]
    assert choice["text"] == "The capital of France is Paris" and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(value <= 0 for value in logprobs["token_logprobs"][1:]) and len(logprobs["tokens"]) > 1
    assert reply["usage"]["completion_tokens"] == 0


def test_models_list_names_the_default(server: Server) -> None:
    with server.client() as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["smollm2"]


def test_curl_json_schema(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-json-schema"], server, ["bash", "-c"]))
    city = json.loads(reply["choices"][0]["message"]["content"])
    assert set(city) == {"name", "country"} and reply["choices"][0]["finish_reason"] == "stop"


def test_python_structured(server: Server) -> None:
    out = run_example(examples()["python-structured"], server, [sys.executable, "-c"])
    assert out.startswith("name=") and "country=" in out


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model beside the README's embedding entry."""
    directory = tmp_path_factory.mktemp("rag")
    shipped = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    minilm = {"name": "minilm", "source": MINILM_SOURCE, "task": "embed"}
    registry = write_registry(directory / "models.yaml", [*shipped, minilm])
    server = start_server(registry, directory, "--kv-cache-memory", "256MiB")
    yield server
    assert server.stop() == 0


def test_curl_rag_round_trip(rag_server: Server) -> None:
    """The nearest passage is the one that answers, and the chat model answers from it."""
    code = examples()["curl-rag"].replace("CONTEXT=${!NEAREST}", 'CONTEXT=${!NEAREST} && echo "nearest: $BEST" >&2')
    result = subprocess.run(
        ["bash", "-c", code.replace("http://127.0.0.1:8000", rag_server.base_url)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "nearest: 1" in result.stderr, result.stderr
    assert "1889" in json.loads(result.stdout)["choices"][0]["message"]["content"]


def test_curl_messages(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-messages"], server, ["bash", "-c"]))
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert reply["content"][0]["type"] == "text" and reply["content"][0]["text"].strip()
    assert reply["stop_reason"] in {"end_turn", "max_tokens"} and reply["usage"]["output_tokens"] > 0


def test_python_anthropic(server: Server) -> None:
    out = run_example(examples()["python-anthropic"], server, [sys.executable, "-c"])
    reply, _, stream = out.partition("\nstream: ")
    assert reply.startswith("reply: ") and reply.removeprefix("reply: ").strip()
    assert stream.strip()


def test_curl_responses(server: Server) -> None:
    reply = json.loads(run_example(examples()["curl-responses"], server, ["bash", "-c"]))
    assert reply["object"] == "response" and reply["status"] in {"completed", "incomplete"}
    message = reply["output"][0]
    assert message["type"] == "message" and message["content"][0]["text"].strip()
    assert reply["usage"]["output_tokens"] > 0


def test_python_responses(server: Server) -> None:
    out = run_example(examples()["python-responses"], server, [sys.executable, "-c"])
    status, _, rest = out.partition(" ")
    assert status in {"completed", "incomplete"} and rest.strip()

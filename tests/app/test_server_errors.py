"""Every failure a client can cause, against a real `tokenmill serve`: OpenAI's error body with the right status,
type, code and param; never FastAPI's 422, never a bare page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry

MODEL = "tiny"
KEY = "sk-test-0123456789"
MAX_BODY = 16384
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def registry(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = model_entry(tiny_llama_dir, MODEL, max_waiting_requests=4, max_num_seqs=4, threads=1)
    return write_registry(tmp_path_factory.mktemp("errors-registry") / "models.yaml", [entry])


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keyed (metrics behind the key too), with a small body limit."""
    logs = tmp_path_factory.mktemp("errors-logs")
    server = start_server(registry, logs, "--api-key", KEY, "--max-body-bytes", str(MAX_BODY), ready_timeout=120)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=30.0, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def anonymous(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=30.0) as client:
        yield client


def assert_error(
    response: httpx.Response, status: int, code: str | None, param: str | None, type_: str = "invalid_request_error"
) -> str:
    """The OpenAI error body, exactly its four fields; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error
    assert isinstance(error["message"], str) and error["message"]
    message: str = error["message"]
    return message


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


def post_raw(client: httpx.Client, path: str, body: str | bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{model_name="{MODEL}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- invalid parameters ------------------------------------------------------------------------------------------

INVALID = [
    # (id, path, body, code, param)
    ("temperature-nan", CHAT, chat(temperature=float("nan")), "invalid_value", "temperature"),
    ("temperature-inf", CHAT, chat(temperature=float("inf")), "invalid_value", "temperature"),
    ("temperature-high", CHAT, chat(temperature=1000), "invalid_value", "temperature"),
    ("temperature-negative", COMPLETIONS, completion(temperature=-0.5), "invalid_value", "temperature"),
    ("top-p-zero", CHAT, chat(top_p=0), "invalid_value", "top_p"),
    ("top-p-high", COMPLETIONS, completion(top_p=1.5), "invalid_value", "top_p"),
    ("n-zero", CHAT, chat(n=0), "invalid_value", "n"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), "invalid_value", "max_tokens"),
    ("max-tokens-negative", COMPLETIONS, completion(max_tokens=-5), "invalid_value", "max_tokens"),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), "invalid_value", "max_completion_tokens"),
    ("presence-penalty-high", CHAT, chat(presence_penalty=3), "invalid_value", "presence_penalty"),
    ("timeout-zero", CHAT, chat(timeout=0), "invalid_value", "timeout"),
    ("temperature-string", CHAT, chat(temperature="hot"), "invalid_value", "temperature"),
    ("n-string", CHAT, chat(n="two"), "invalid_value", "n"),
    ("max-tokens-fraction", CHAT, chat(max_tokens=1.5), "invalid_value", "max_tokens"),
    ("model-number", CHAT, chat(model=5), "invalid_value", "model"),
    ("messages-string", CHAT, chat(messages="hi"), "invalid_value", "messages"),
    ("messages-empty", CHAT, chat(messages=[]), "invalid_value", "messages"),
    ("role-unknown", CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), "invalid_value", "messages.0.role"),
    ("prompt-number", COMPLETIONS, completion(prompt=5), "invalid_value", "prompt"),
    ("messages-missing", CHAT, {"model": MODEL}, "missing_required_parameter", "messages"),
    ("model-missing", COMPLETIONS, {"prompt": "hi"}, "missing_required_parameter", "model"),
    ("unknown-field", CHAT, chat(temprature=0.5), "unknown_parameter", "temprature"),
    ("unknown-field-completions", COMPLETIONS, completion(foo=1), "unknown_parameter", "foo"),
    ("functions", CHAT, chat(functions=[{"name": "f"}]), "unsupported_parameter", "functions"),
    ("audio", CHAT, chat(audio={"voice": "alloy", "format": "wav"}), "unsupported_parameter", "audio"),
    ("suffix", COMPLETIONS, completion(suffix="!"), "unsupported_parameter", "suffix"),
    ("logit-bias-outside-vocab", CHAT, chat(logit_bias={"100000": 5}), "invalid_value", "logit_bias"),
    ("logit-bias-outside-vocab-cmpl", COMPLETIONS, completion(logit_bias={"99999": 1}), "invalid_value", "logit_bias"),
    ("logit-bias-negative-id", CHAT, chat(logit_bias={"-1": 5}), "invalid_value", "logit_bias"),
    ("logit-bias-not-an-id", CHAT, chat(logit_bias={"hello": 5}), "invalid_value", "logit_bias"),
    ("logit-bias-too-strong", CHAT, chat(logit_bias={"5": 101}), "invalid_value", "logit_bias"),
    ("stop-token-ids-outside-vocab", CHAT, chat(stop_token_ids=[100000]), "invalid_value", "stop_token_ids"),
]


@pytest.mark.parametrize(("path", "body", "code", "param"), [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_parameters_are_400_naming_the_field(
    client: httpx.Client, path: str, body: dict[str, Any], code: str, param: str
) -> None:
    # json.dumps writes NaN and Infinity as Python's json module reads them, as a lenient client would send them
    response = post_raw(client, path, json.dumps(body))
    assert_error(response, 400, code, param)


@pytest.mark.parametrize("fields", [{"stream": "yes"}, {"ignore_eos": 1}, {"n": True}], ids=["stream", "eos", "n"])
def test_loosely_typed_values_are_400(client: httpx.Client, fields: dict[str, Any]) -> None:
    response = client.post(CHAT, json=chat(**fields))
    assert_error(response, 400, "invalid_value", next(iter(fields)))


def test_unsupported_fields_with_no_op_values_are_accepted(client: httpx.Client) -> None:
    response = client.post(CHAT, json=chat(functions=None, function_call="none", store=False))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "body",
    [b'{"model": "tiny", ', b"not json at all", b'{"model": "tiny",}', b"\xff\xfe", b'{"model": "\xff"}'],
    ids=["truncated", "text", "trailing-comma", "not-utf8", "not-utf8-inside"],
)
def test_malformed_json_is_400_never_422(client: httpx.Client, body: bytes) -> None:
    assert_error(post_raw(client, CHAT, body), 400, "invalid_json", None)


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"", "missing_required_parameter"), (b"[1, 2]", "invalid_value"), (b'"hello"', "invalid_value")],
    ids=["empty", "array", "string"],
)
def test_a_body_that_is_not_an_object_is_400(client: httpx.Client, body: bytes, code: str) -> None:
    assert_error(post_raw(client, COMPLETIONS, body), 400, code, None)


# --- context length, model, vocabulary ---------------------------------------------------------------------------


def _prompt_length(client: httpx.Client) -> tuple[int, int]:
    response = client.post("/tokenize", json={"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 200, response.text
    body = response.json()
    return int(body["count"]), int(body["max_model_len"])


def test_context_length_exceeded_is_decided_before_queueing(client: httpx.Client) -> None:
    count, limit = _prompt_length(client)
    queries = metric(client, "tokenmill_prefix_cache_queries_total")
    over = limit - count + 1
    message = assert_error(client.post(CHAT, json=chat(max_tokens=over)), 400, "context_length_exceeded", "messages")
    assert str(limit) in message and str(count + over) in message
    long_chat = chat(messages=[{"role": "user", "content": "hello " * 2 * limit}], max_tokens=None)
    assert_error(client.post(CHAT, json=long_chat), 400, "context_length_exceeded", "messages")
    assert_error(
        client.post(CHAT, json=chat(max_tokens=None, max_completion_tokens=10 * limit)),
        400,
        "context_length_exceeded",
        "messages",
    )
    # the worker never saw them: it would have looked their prompts up in its prefix cache
    assert metric(client, "tokenmill_prefix_cache_queries_total") == queries


def test_completion_context_length_exceeded_names_the_prompt(client: httpx.Client) -> None:
    response = client.post(COMPLETIONS, json=completion(max_tokens=10_000))
    message = assert_error(response, 400, "context_length_exceeded", "prompt")
    assert "prompt" in message


def test_completion_context_length_exceeded_is_400(client: httpx.Client) -> None:
    response = client.post(COMPLETIONS, json=completion(prompt="hello " * 1000, max_tokens=1))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat(model="gpt-4o")),
        (COMPLETIONS, completion(model="no-such-model")),
        ("/tokenize", {"model": "no-such-model", "prompt": "hi"}),
    ],
    ids=["chat", "completions", "tokenize"],
)
def test_unknown_model_is_404(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    message = assert_error(client.post(path, json=body), 404, "model_not_found", "model")
    assert body["model"] in message


def test_prompt_token_ids_outside_the_vocabulary_are_400(client: httpx.Client) -> None:
    response = client.post(COMPLETIONS, json=completion(prompt=[1, 2, 100_000]))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


# --- routes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nope"), ("POST", "/v1/chat/completion"), ("GET", "/"), ("POST", "/v2/completions")],
)
def test_unknown_route_is_404(client: httpx.Client, method: str, path: str) -> None:
    message = assert_error(client.request(method, path, json={}), 404, "unknown_url", None)
    assert path in message


def test_wrong_method_is_405(client: httpx.Client) -> None:
    assert_error(client.get(CHAT), 405, "method_not_allowed", None)


# --- body size ---------------------------------------------------------------------------------------------------


def _oversized() -> bytes:
    return json.dumps(chat(messages=[{"role": "user", "content": "x" * 3 * MAX_BODY}])).encode()


def test_oversized_body_with_content_length_is_413(client: httpx.Client) -> None:
    body = _oversized()
    response = post_raw(client, CHAT, body)
    assert response.request.headers["content-length"] == str(len(body))
    assert_error(response, 413, "request_too_large", None)


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    body = _oversized()
    chunks = (body[i : i + 1024] for i in range(0, len(body), 1024))
    response = client.post(CHAT, content=chunks, headers={"content-type": "application/json"})
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "request_too_large", None)


def test_a_chunked_body_under_the_limit_is_served(client: httpx.Client) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY - 100)}).encode()
    assert len(body) < MAX_BODY
    chunks = (body[i : i + 1024] for i in range(0, len(body), 1024))
    response = client.post("/tokenize", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


# --- API key -----------------------------------------------------------------------------------------------------

PROTECTED = [
    ("POST", CHAT, chat()),
    ("POST", COMPLETIONS, completion()),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/metrics", None),
]
BAD_AUTH = {
    "missing": {},
    "wrong": {"Authorization": "Bearer sk-wrong"},
    "prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "no-scheme": {"Authorization": KEY},
    "basic": {"Authorization": f"Basic {KEY}"},
    "no-token": {"Authorization": "Bearer"},
}


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_missing_or_wrong_key_is_401(
    anonymous: httpx.Client, auth: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = anonymous.request(method, path, json=body, headers=BAD_AUTH[auth])
    assert_error(response, 401, "invalid_api_key", None)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_the_right_key_is_let_in(anonymous: httpx.Client, method: str, path: str, body: dict[str, Any] | None) -> None:
    response = anonymous.request(method, path, json=body, headers={"Authorization": f"bearer {KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_health_and_ready_stay_open(anonymous: httpx.Client, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 200, response.text


def test_metrics_open_serves_metrics_without_the_key(registry: Path, tmp_path: Path) -> None:
    server = start_server(registry, tmp_path, "--api-key", KEY, "--metrics-open", ready_timeout=120)
    try:
        with server.client(timeout=30.0) as anonymous:
            response = anonymous.get("/metrics")
            assert response.status_code == 200, response.text
            assert "tokenmill_num_requests_running" in response.text
            assert_error(anonymous.get("/v1/models"), 401, "invalid_api_key", None)
            assert_error(anonymous.post(CHAT, json=chat()), 401, "invalid_api_key", None)
    finally:
        assert server.stop() == 0

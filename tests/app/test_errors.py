"""Every failure reaches the client as OpenAI's error body with the right status: never FastAPI's 422 or a bare 500."""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from app.errors import APIError, install_error_handlers, request_id_of
from app.protocol import ChatCompletionRequest
from worker.messages import SamplingParams

USER = [{"role": "user", "content": "Hi"}]


def build_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest) -> dict[str, Any]:
        params = request.to_sampling_params(default_max_tokens=16)  # may raise InvalidRequest
        if request.model != "smollm2":
            raise APIError.model_not_found(request.model)
        return {"max_tokens": params.max_tokens}

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        errors = {
            "context": APIError.context_length_exceeded(2048, prompt_tokens=2000, max_tokens=100),
            "context-prompt": APIError.context_length_exceeded(2048, prompt_tokens=3000, param="prompt"),
            "key": APIError.invalid_api_key(),
            "large": APIError.request_too_large(1024),
            "busy": APIError.rate_limited("Too many requests waiting for this model.", retry_after=2.5),
            "starting": APIError.unavailable("The model is loading.", retry_after=10),
        }
        if kind == "http-413":
            raise HTTPException(413, "Content Too Large")
        if kind == "http-418":
            raise HTTPException(418, "I'm a teapot")
        if kind == "sampling":
            SamplingParams(top_p=2.0)
        if kind in errors:
            raise errors[kind]
        raise RuntimeError("secret database password hunter2")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(build_app(), raise_server_exceptions=False)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_a_valid_request_passes(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": USER, "max_tokens": 3})
    assert response.json() == {"max_tokens": 3}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER}, "model", "missing_required_parameter"),
        ({"model": "smollm2"}, "messages", "missing_required_parameter"),
        ({"model": "smollm2", "messages": USER, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"model": "smollm2", "messages": USER, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"model": "smollm2", "messages": USER, "temperature": "hot"}, "temperature", "invalid_value"),
        ({"model": "smollm2", "messages": USER, "stop": 3}, "stop", "invalid_value"),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
            "invalid_value",
        ),
        ({"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_value"),
    ],
)
def test_validation_errors_are_400_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str, code: str
) -> None:
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert param.split(".")[-1] in error["message"] or code == "invalid_value"


def test_missing_field_message(client: TestClient) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"model": "smollm2"}), 400)
    assert error["message"] == "Missing required parameter: 'messages'."


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert (error["code"], error["param"]) == ("invalid_json", None)


@pytest.mark.parametrize("body", [b"", b"[1, 2]"])
def test_a_body_that_is_not_an_object_is_400(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert error_of(response, 400)["message"] in (
        "The request needs a JSON body.",
        "The request body must be a JSON object.",
    )


def test_invalid_sampling_params_are_400_with_their_param(client: TestClient) -> None:
    body = {"model": "smollm2", "messages": USER, "logit_bias": {"x": 1}}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("logit_bias", "invalid_value")
    error = error_of(client.get("/raise/sampling"), 400)
    assert error["param"] == "top_p" and "top_p must be in (0, 1]" in error["message"]


def test_model_not_found(client: TestClient) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER}), 404)
    assert error == {
        "message": "The model `gpt-9` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


@pytest.mark.parametrize(
    ("kind", "status", "type_", "code", "param"),
    [
        ("context", 400, "invalid_request_error", "context_length_exceeded", "messages"),
        ("context-prompt", 400, "invalid_request_error", "context_length_exceeded", "prompt"),
        ("key", 401, "invalid_request_error", "invalid_api_key", None),
        ("large", 413, "invalid_request_error", "request_too_large", None),
        ("busy", 429, "requests", "rate_limit_exceeded", None),
        ("starting", 503, "server_error", "service_unavailable", None),
    ],
)
def test_api_errors(client: TestClient, kind: str, status: int, type_: str, code: str, param: str | None) -> None:
    error = error_of(client.get(f"/raise/{kind}"), status)
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)


def test_context_length_message_gives_the_numbers(client: TestClient) -> None:
    assert error_of(client.get("/raise/context"), 400)["message"] == (
        "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
        "(2000 in the messages, 100 in the completion). Please reduce the length of the messages or completion."
    )


def test_overload_carries_retry_after(client: TestClient) -> None:
    assert client.get("/raise/busy").headers["retry-after"] == "3"
    assert client.get("/raise/starting").headers["retry-after"] == "10"
    assert client.get("/raise/key").headers["www-authenticate"] == "Bearer"


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    error = error_of(client.get("/v1/nope"), 404)
    assert (error["message"], error["code"]) == ("Invalid URL (GET /v1/nope)", "unknown_url")
    response = client.get("/v1/chat/completions")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_other_http_errors_keep_their_status(client: TestClient) -> None:
    assert error_of(client.get("/raise/http-413"), 413)["code"] == "request_too_large"
    assert error_of(client.get("/raise/http-418"), 418)["message"] == "I'm a teapot"


def test_crash_is_500_with_a_request_id_and_no_internals(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        response = client.get("/raise/crash", headers={"x-request-id": "req-abc"})
    error = error_of(response, 500)
    assert error["type"] == "server_error" and "req-abc" in error["message"]
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert response.headers["x-request-id"] == "req-abc"
    assert "req-abc" in caplog.text and "hunter2" in caplog.text  # the log keeps the details
    generated = error_of(client.get("/raise/crash"), 500)["message"]
    assert "req_" in generated


def test_request_id_prefers_the_one_already_assigned() -> None:
    app = FastAPI()

    @app.get("/")
    async def show(request: Request) -> dict[str, str]:
        request.state.request_id = "mine"
        return {"id": request_id_of(request)}

    assert TestClient(app).get("/", headers={"x-request-id": "theirs"}).json() == {"id": "mine"}


def test_the_openai_client_reads_our_errors(client: TestClient) -> None:
    sdk = openai.OpenAI(api_key="x", base_url="http://testserver/v1", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert (missing.value.code, missing.value.param, missing.value.type) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], temperature=500)
    assert bad.value.param == "temperature"

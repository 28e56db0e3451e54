"""Third-party chat clients against a real server on the default model (SmolLM2, whose template teaches no tools):
LangChain's ChatOpenAI (invoke, stream, with_structured_output by function calling and by JSON schema), instructor in
its default tools mode, and LiteLLM's openai/ provider with tools; each as users write it, unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import instructor
import litellm
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr

from tests.server_harness import REPO, Server, start_server

pytestmark = pytest.mark.slow

ASK = "Paris is the capital of France. Extract the city and its country."


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(REPO / "models.yaml", tmp_path_factory.mktemp("clients"), "--kv-cache-memory", "256MiB")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def chat(server: Server) -> ChatOpenAI:
    url = f"{server.base_url}/v1"
    return ChatOpenAI(model="smollm2", base_url=url, api_key=SecretStr("x"), temperature=0, max_completion_tokens=64)


def check_city(city: Any) -> None:
    assert isinstance(city, City) and city.name.strip() and city.country.strip(), city


def test_langchain_invoke_and_stream(chat: ChatOpenAI) -> None:
    reply = chat.invoke("What is the capital of France?")
    assert isinstance(reply.content, str) and reply.content.strip()
    assert reply.response_metadata["finish_reason"] in {"stop", "length"}
    pieces = [chunk.content for chunk in chat.stream("What is the capital of France?")]
    assert len(pieces) > 2 and "".join(str(p) for p in pieces) == reply.content  # greedy: the same text


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(chat: ChatOpenAI, method: Literal["function_calling", "json_schema"]) -> None:
    check_city(chat.with_structured_output(City, method=method).invoke(ASK))


def test_instructor_default_tools_mode(server: Server) -> None:
    client = instructor.from_openai(openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0))
    messages: Any = [{"role": "user", "content": ASK}]
    city = client.chat.completions.create(
        model="smollm2", response_model=City, messages=messages, temperature=0, max_tokens=64, max_retries=0
    )
    check_city(city)


def test_litellm_tools(server: Server) -> None:
    schema = City.model_json_schema()
    tools = [
        {"type": "function", "function": {"name": "record_city", "description": "Record a city", "parameters": schema}}
    ]
    reply: Any = litellm.completion(
        model="openai/smollm2",
        api_base=f"{server.base_url}/v1",
        api_key="x",
        messages=[{"role": "user", "content": ASK}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "record_city"}},
        temperature=0,
        max_tokens=64,
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "record_city"
    check_city(City.model_validate(json.loads(call.function.arguments)))

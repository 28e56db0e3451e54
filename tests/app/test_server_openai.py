"""End to end through the official OpenAI client and raw HTTP: one real `tokenmill serve` for the module, serving
SmolLM2 in fp32 (so greedy decoding is exact) and a tiny random model. Small max_tokens keep it quick on 2 cores."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import torch
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server_harness import Server, start_server, write_registry

pytestmark = pytest.mark.slow

MODEL = "smollm2"
TINY = "tiny"
TIMEOUT = 120.0  # per request: generous for 2 busy cores, and no test can hang
BLOCK_SIZE = 16  # the registry's default KV block: the prefix cache reuses whole blocks
FRANCE = "What is the capital of France?"
FRANCE_PROMPT = "The capital of France is"
REPLACEMENT = "\ufffd"


def user(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_llama_dir: Path) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("server-openai")
    common = {"dtype": "float32", "device": "cpu"}
    registry = write_registry(
        directory / "models.yaml",
        [
            {"name": MODEL, "source": str(smollm2_dir), **common, "kv_cache_memory": "256MiB"},
            {"name": TINY, "source": str(tiny_llama_dir), **common, "kv_cache_memory": "16MiB"},
        ],
    )
    server = start_server(registry, directory, ready_timeout=300.0)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=TIMEOUT) as c:
        yield c


# --- helpers -------------------------------------------------------------------------------------------------------


def greedy_chat(client: openai.OpenAI, content: str, max_tokens: int, **kwargs: Any) -> ChatCompletion:
    return client.chat.completions.create(
        model=MODEL, messages=user(content), max_tokens=max_tokens, temperature=0, **kwargs
    )


def stream_chat(client: openai.OpenAI, content: str, max_tokens: int, **kwargs: Any) -> tuple[list[str], str | None]:
    """The content deltas of a greedy chat stream, and its finish reason."""
    deltas: list[str] = []
    finish: str | None = None
    stream = client.chat.completions.create(
        model=MODEL, messages=user(content), max_tokens=max_tokens, temperature=0, stream=True, **kwargs
    )
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    deltas.append(choice.delta.content)
                if choice.finish_reason is not None:
                    assert finish is None, "two finish reasons for one choice"
                    finish = choice.finish_reason
    return deltas, finish


def usage_of(response: ChatCompletion | Completion) -> CompletionUsage:
    assert response.usage is not None
    return response.usage


def cached_tokens(usage: CompletionUsage) -> int:
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    return usage.prompt_tokens_details.cached_tokens


def sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POSTs a streaming request and checks OpenAI's wire format byte for byte: `data: {json}\\n\\n` events, then
    exactly `data: [DONE]\\n\\n` last. Returns the decoded JSON events."""
    with http.stream("POST", path, json=body) as response:
        raw = response.read()
        assert response.status_code == 200, raw
        assert response.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks: list[dict[str, Any]] = []
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event, event
        chunks.append(json.loads(event.removeprefix(b"data: ")))
    return chunks


def is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def is_emoji(char: str) -> bool:
    return ord(char) >= 0x1F300


# --- models, tokenize ----------------------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, TINY]
    assert all(m.object == "model" for m in models.data)
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == 8192


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello, 世界! 🙂 tokens round-trip"
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 8192
    back = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    # the other model has its own tokenizer
    tiny = http.post("/tokenize", json={"model": TINY, "prompt": text}).json()
    assert tiny["tokens"] != tokens["tokens"]
    assert http.post("/detokenize", json={"model": TINY, "tokens": tiny["tokens"]}).json()["prompt"] == text


def test_tokenize_messages_counts_the_chat_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    reply = greedy_chat(client, FRANCE, 1)
    assert usage_of(reply).prompt_tokens == tokens["count"]


# --- chat and completions ------------------------------------------------------------------------------------------


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    reply = greedy_chat(client, FRANCE, 12)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    usage = usage_of(reply)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 12

    deltas, finish = stream_chat(client, FRANCE, 12)
    assert "".join(deltas) == choice.message.content
    assert finish == choice.finish_reason


def test_completions_stream_equals_non_stream(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=FRANCE_PROMPT, max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.text.startswith(" Paris")
    assert choice.finish_reason == "length"
    usage = usage_of(reply)
    assert usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + 5

    stream = client.completions.create(
        model=MODEL,
        prompt=FRANCE_PROMPT,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finishes, usages = [], [], []
    with stream:
        for chunk in stream:
            text += [c.text for c in chunk.choices]
            finishes += [c.finish_reason for c in chunk.choices if c.finish_reason is not None]
            if chunk.usage is not None:
                usages.append(chunk.usage)
    assert "".join(text) == choice.text
    assert finishes == ["length"]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(usage.prompt_tokens, 5)]


def test_usage_counts_cached_prompt_tokens(client: openai.OpenAI) -> None:
    # A unique start: no earlier request shares even the first block.
    prompt = f"{uuid.uuid4().hex} " + "The paged KV cache keeps keys and values in fixed-size blocks. " * 4
    first = usage_of(client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0))
    assert first.prompt_tokens > 2 * BLOCK_SIZE
    assert cached_tokens(first) == 0
    second = usage_of(client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0))
    assert second.prompt_tokens == first.prompt_tokens
    cached = cached_tokens(second)
    assert 2 * BLOCK_SIZE <= cached < second.prompt_tokens
    assert cached % BLOCK_SIZE == 0
    assert second.total_tokens == second.prompt_tokens + second.completion_tokens


# --- stop strings --------------------------------------------------------------------------------------------------


def test_stop_string_spanning_tokens(client: openai.OpenAI) -> None:
    base = greedy_chat(client, FRANCE, 12, logprobs=True)
    text = base.choices[0].message.content or ""
    assert base.choices[0].logprobs is not None and base.choices[0].logprobs.content is not None
    tokens = [t.token for t in base.choices[0].logprobs.content]
    stop = "of Fr"  # ' of' + ' France': the match starts in one token and ends in the next
    assert stop in text, text
    spans = [i for i in range(len(tokens)) if stop in "".join(tokens[: i + 1])]
    assert stop not in "".join(tokens[: spans[0]]) and not any(stop in t for t in tokens)
    want = text[: text.index(stop)]

    reply = greedy_chat(client, FRANCE, 12, stop=[stop], logprobs=True)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop"
    # tokens count up to the one that completed the stop string, not those after it
    assert usage_of(reply).completion_tokens == spans[0] + 1
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    assert len(reply.choices[0].logprobs.content) == spans[0] + 1

    deltas, finish = stream_chat(client, FRANCE, 12, stop=stop)
    assert "".join(deltas) == want
    assert finish == "stop"


def test_earliest_stop_string_wins(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": FRANCE_PROMPT, "max_tokens": 5, "temperature": 0}
    reply = client.completions.create(**kwargs, stop=["\n", "."])
    assert reply.choices[0].text == " Paris"
    assert reply.choices[0].finish_reason == "stop"
    assert usage_of(reply).completion_tokens == 2  # ' Paris', '.'

    stream = client.completions.create(**kwargs, stop=["\n", "."], stream=True, stream_options={"include_usage": True})
    text, finishes, completion_tokens = "", [], []
    with stream:
        for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            finishes += [c.finish_reason for c in chunk.choices if c.finish_reason is not None]
            completion_tokens += [chunk.usage.completion_tokens] if chunk.usage is not None else []
    assert (text, finishes, completion_tokens) == (" Paris", ["stop"], [2])


def test_held_back_stop_prefix_is_released(client: openai.OpenAI) -> None:
    """A stop string's beginning ('.') is held back while it might complete; when it does not, it is emitted."""
    base = greedy_chat(client, FRANCE, 12)
    text = base.choices[0].message.content or ""
    assert base.choices[0].finish_reason == "stop" and text.endswith("."), text
    stop = [". Bye", "Paris!"]
    reply = greedy_chat(client, FRANCE, 12, stop=stop)
    assert reply.choices[0].message.content == text
    assert usage_of(reply).completion_tokens == usage_of(base).completion_tokens
    deltas, finish = stream_chat(client, FRANCE, 12, stop=stop)
    assert "".join(deltas) == text
    assert finish == "stop"


# --- sampling: seed, n ---------------------------------------------------------------------------------------------


def sampled(client: openai.OpenAI, seed: int | None, temperature: float = 1.0) -> str:
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=temperature, seed=seed
    )
    return reply.choices[0].text


def test_seed_reproducible_whatever_the_batch(client: openai.OpenAI) -> None:
    alone = sampled(client, 1234)
    # the same seed again, batched with a different seed and a greedy request
    with ThreadPoolExecutor(3) as pool:
        again, other, _ = pool.map(lambda args: sampled(client, *args), [(1234, 1.0), (4321, 1.0), (None, 0.0)])
    assert again == alone
    assert other != alone


def test_n_choices(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 6, "temperature": 1.0, "seed": 7, "extra_body": {"ignore_eos": True}}
    reply = client.chat.completions.create(model=MODEL, messages=user(FRANCE), n=2, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in reply.choices)
    texts = [c.message.content for c in reply.choices]
    assert texts[0] != texts[1]
    single = client.chat.completions.create(model=MODEL, messages=user(FRANCE), **kwargs)
    assert single.choices[0].message.content == texts[0]  # the first choice uses the request's own seed
    usage = usage_of(reply)
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens == usage_of(single).prompt_tokens  # the prompt counts once

    stream = client.chat.completions.create(model=MODEL, messages=user(FRANCE), n=2, stream=True, **kwargs)
    streamed, roles, finishes = ["", ""], [0, 0], [0, 0]
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
                roles[choice.index] += choice.delta.role == "assistant"
                finishes[choice.index] += choice.finish_reason == "length"
    assert streamed == texts
    assert roles == finishes == [1, 1]


# --- logprobs ------------------------------------------------------------------------------------------------------


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = greedy_chat(client, FRANCE, 6, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == usage_of(reply).completion_tokens == 6
    assert "".join(item.token for item in content) == choice.message.content
    for item in content:
        assert item.logprob <= 0
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3
        values = [alt.logprob for alt in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)

    stream = client.chat.completions.create(
        model=MODEL, messages=user(FRANCE), max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = []
    with stream:
        for chunk in stream:
            for c in chunk.choices:
                if c.logprobs is not None and c.logprobs.content:
                    streamed += [(t.token, t.logprob) for t in c.logprobs.content]
    # Same tokens; logprobs equal up to float noise (a prefix-cache hit computes the prompt in other chunks).
    assert [token for token, _ in streamed] == [t.token for t in content]
    assert [logprob for _, logprob in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)


def test_completions_text_offset_counts_characters_not_token_pieces(client: openai.OpenAI) -> None:
    """The tiny byte-level vocabulary splits 'é' and '你' into several tokens; a token that ends inside a character
    adds no text, so it shares its offset with the token that completes it, streamed or not."""
    text = "héllo 你好 ok"
    body: Any = {"guided_regex": re.escape(text).replace("\\ ", " ")}
    args: Any = {"model": TINY, "prompt": "hi", "max_tokens": 40, "temperature": 0, "logprobs": 0, "echo": True}
    whole = client.completions.create(**args, extra_body=body).choices[0]
    echo = len("hi")
    assert whole.text == "hi" + text and whole.logprobs is not None and whole.logprobs.tokens is not None
    all_offsets = whole.logprobs.text_offset or []
    # the echoed prompt's tokens come first (the first with no logprob), then the generated ones
    prompt_tokens = next(i for i in range(len(whole.logprobs.tokens)) if "".join(whole.logprobs.tokens[:i]) == "hi")
    offsets, tokens = all_offsets[prompt_tokens:], whole.logprobs.tokens[prompt_tokens:]
    assert all_offsets[:prompt_tokens][0] == 0 and (whole.logprobs.token_logprobs or [0.0])[0] is None
    assert offsets == sorted(offsets) and offsets[0] == echo and len(set(offsets)) < len(offsets)  # some shared
    assert tokens[-1] == "<|im_end|>"  # the grammar's end; special, so it adds no text
    for token, offset in zip(tokens[:-1], offsets[:-1], strict=True):
        if REPLACEMENT not in token:  # a whole-character token starts exactly where its text is
            assert whole.text[offset : offset + len(token)] == token
    streamed: list[int] = []
    for chunk in client.completions.create(**args, extra_body=body, stream=True):
        for choice in chunk.choices:
            streamed += choice.logprobs.text_offset if choice.logprobs else []
    assert streamed == all_offsets


def test_completions_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=FRANCE_PROMPT, max_tokens=5, temperature=0, logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == choice.text
    offset = 0
    for token, logprob, top, text_offset in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True
    ):
        assert text_offset == offset
        offset += len(token)
        assert logprob <= 0
        assert len(top) == 2 and all(v <= 0 for v in top.values())
        assert max(top, key=lambda t: top[t]) == token  # greedy: the top alternative is the chosen token
        assert top[token] == pytest.approx(logprob, abs=1e-6)


def test_completions_logprobs_always_hold_the_sampled_token(client: openai.OpenAI) -> None:
    """OpenAI: 'the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements'. Sampling hot picks tokens outside the top one."""
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=2.0, seed=3, logprobs=1
    )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    unlikely = 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == pytest.approx(logprob, abs=1e-6)
        assert 1 <= len(top) <= 2
        unlikely += len(top) == 2
    assert unlikely > 0, "the seed should sample a token other than the most likely at least once"


# --- completions: echo, token ids ----------------------------------------------------------------------------------


def test_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=FRANCE_PROMPT, max_tokens=3, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=FRANCE_PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == FRANCE_PROMPT + plain.choices[0].text
    assert usage_of(echoed).completion_tokens == 3


def test_token_id_prompts(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": FRANCE_PROMPT}).json()["tokens"]
    other = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=FRANCE_PROMPT, max_tokens=3, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert by_ids.choices[0].text == FRANCE_PROMPT + by_text.choices[0].text
    assert usage_of(by_ids).prompt_tokens == len(ids)

    batch = client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert usage_of(batch).prompt_tokens == len(ids) + len(other)
    assert usage_of(batch).completion_tokens == 6


# --- raw SSE wire format -------------------------------------------------------------------------------------------


def test_chat_sse_wire_format(http: httpx.Client) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": FRANCE}],
        "max_tokens": 5,
        "temperature": 0,
    }
    reply = http.post("/v1/chat/completions", json=body).json()
    chunks = sse(http, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert all(isinstance(c["created"], int) for c in chunks)

    first, *middle, finish, usage = chunks
    assert first["choices"][0]["index"] == 0
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] is None
    for chunk in middle:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    assert finish["choices"][0]["finish_reason"] == "length"
    assert set(finish["choices"][0]["delta"]) <= {"content"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == reply["choices"][0]["message"]["content"]
    assert usage["choices"] == []
    assert usage["usage"] == reply["usage"] | {"prompt_tokens_details": usage["usage"]["prompt_tokens_details"]}
    assert usage["usage"]["completion_tokens"] == 5


def test_completions_sse_wire_format_with_n_and_echo(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": FRANCE_PROMPT, "max_tokens": 3, "temperature": 0, "n": 2, "echo": True}
    chunks = sse(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    *choice_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in choice_chunks:
        [choice] = chunk["choices"]
        if not texts[choice["index"]]:
            assert choice["text"] == FRANCE_PROMPT  # the echo comes first
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert finishes == {0: ["length"], 1: ["length"]}
    assert texts[0] == texts[1]  # greedy: both choices alike
    assert texts[0].startswith(FRANCE_PROMPT + " Paris")


def test_tiny_model_streams(http: httpx.Client) -> None:
    body = {"model": TINY, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    reply = http.post("/v1/completions", json=body).json()
    assert reply["model"] == TINY and reply["usage"]["completion_tokens"] == 24
    chunks = sse(http, "/v1/completions", {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply["choices"][0]["text"]


# --- text beyond ASCII ---------------------------------------------------------------------------------------------


def test_chinese_and_emoji_stream_reassemble(client: openai.OpenAI) -> None:
    question = "请用中文回答：你好吗？😊"
    # 15 tokens end on a character boundary: CJK and emoji take 2-3 byte-level tokens each.
    reply = greedy_chat(client, question, 15, logprobs=True)
    text = reply.choices[0].message.content or ""
    assert REPLACEMENT not in text
    assert any(is_cjk(c) for c in text) and any(is_emoji(c) for c in text), text
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert bytes(b for item in logprobs.content for b in item.bytes or []).decode() == text

    deltas, _ = stream_chat(client, question, 15)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_chinese_and_emoji_prompt_echo_stream(client: openai.OpenAI) -> None:
    prompt = "中文：你好，世界！🙂🎉 English: Hello, world! 中文：我爱你 🚀"
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True}
    text = client.completions.create(**kwargs).choices[0].text
    assert text.startswith(prompt) and REPLACEMENT not in text
    stream = client.completions.create(**kwargs, stream=True)
    with stream:
        pieces = [c.text for chunk in stream for c in chunk.choices]
    assert pieces[0] == prompt
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)


# --- concurrency ---------------------------------------------------------------------------------------------------

QUESTIONS = [FRANCE, "Write a haiku about the sea.", "hi", "What is 12 times 12?"]


async def stream_text(client: openai.AsyncOpenAI, question: str) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=user(question), max_tokens=8, temperature=0, stream=True
    )
    text, finish = "", None
    async with stream:
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    return text, finish


def test_concurrent_streams_equal_each_alone(server: Server) -> None:
    async def main() -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT
        ) as client:
            alone = [await stream_text(client, q) for q in QUESTIONS]
            together = await asyncio.gather(*(stream_text(client, q) for q in QUESTIONS * 4))
            return alone, list(together)

    alone, together = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert all(text for text, _ in alone)
    assert together == alone * 4


# --- exactness -----------------------------------------------------------------------------------------------------


def test_greedy_chat_equals_transformers_generate(client: openai.OpenAI, http: httpx.Client, smollm2_dir: Path) -> None:
    question, max_tokens = "Write a haiku about the sea.", 16
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = cast(
        list[int],
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        ),
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = cast(list[int], out[0, len(ids) :].tolist())
    want = tokenizer.decode(new, skip_special_tokens=True)

    templated = http.post("/tokenize", json={"model": MODEL, "messages": user(question)}).json()
    assert templated["tokens"] == ids  # the server's chat template equals transformers'
    reply = greedy_chat(client, question, max_tokens)
    assert reply.choices[0].message.content == want
    assert usage_of(reply).prompt_tokens == len(ids)
    assert usage_of(reply).completion_tokens == len(new)
    assert reply.choices[0].finish_reason == ("stop" if new[-1] == tokenizer.eos_token_id else "length")


def test_server_log_is_clean(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]

"""Scoring prompts over HTTP, against the tiny model's own float32 forward: OpenAI's legacy echo with logprobs (the
prompt's tokens first, the first one null; max_tokens 0 scores without generating, as lm-evaluation-harness asks) and
vLLM's prompt_logprobs on completions and chat, with the prompt spread over several prefill chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server_harness import Server, model_entry, start_server, write_registry

MODEL = "tiny"
PROMPT = (
    "The scheduler counts tokens, not phases; prefill and decode are the same arithmetic. A paged KV cache keeps the "
    "keys and values of every request in fixed-size blocks; 0 1 2 3 42 and Ünïcödé 🙂 你好 are split into bytes too."
)
MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("prompt-logprobs")
    entry = model_entry(tiny_llama_dir, MODEL, max_num_batched_tokens=16, threads=1)
    server = start_server(write_registry(directory / "models.yaml", [entry]), directory, ready_timeout=120)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def forward(tiny_llama_dir: Path) -> Any:
    """log_softmax of the model's own float32 logits at every position of a prompt of token ids."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)

    return logprobs


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_echo_with_max_tokens_zero_scores_the_prompt(http: httpx.Client, tokenizer: Any, forward: Any) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(ids) > 2 * 16, "the prompt should take several prefill chunks"
    reply = post(http, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0})
    choice = reply["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 0 and reply["usage"]["prompt_tokens"] == len(ids)
    lp, ref = choice["logprobs"], forward(ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(set(offsets)) < len(offsets)  # bytes of a character
    for token, offset in zip(lp["tokens"], offsets, strict=True):
        if "\ufffd" not in token:  # a whole-character token starts exactly where its text is
            assert PROMPT[offset : offset + len(token)] == token
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        top = lp["top_logprobs"][i]
        best = ref[i - 1].topk(2)
        expected = {tokenizer.decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)}
        expected.setdefault(lp["tokens"][i], float(ref[i - 1, ids[i]]))
        assert top.keys() == expected.keys()
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)


def test_openai_sdk_scores_as_lm_eval_does(server: Server, tokenizer: Any, forward: Any) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        reply = client.completions.create(
            model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, temperature=0
        )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    score = sum(value for value in lp.token_logprobs[1:] if value is not None)
    ref = forward(ids)
    assert score == pytest.approx(sum(float(ref[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-3)


def test_echo_logprobs_then_generated_ones_streamed_or_not(http: httpx.Client, tokenizer: Any) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 4, "ignore_eos": True}
    choice = post(http, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 and lp["token_logprobs"][0] is None
    assert all(value is not None for value in lp["token_logprobs"][1:])
    assert lp["text_offset"][len(ids)] == len(PROMPT)
    streamed_text = ""
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "temperature": 0, "stream": True, **body}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for part in json.loads(line[6:])["choices"]:
                    streamed_text += part["text"]
                    for key, values in streamed.items():
                        values += part["logprobs"][key] if part["logprobs"] else []
    assert streamed_text == choice["text"]
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-4)


def assert_vllm_shape(got: list[Any], ids: list[int], ref: torch.Tensor, k: int, tokenizer: Any) -> None:
    """[null, {"<token id>": {"logprob", "rank", "decoded_token"}}, ...]: the prompt token (its own rank) and the
    top k (ranks 1 to k)."""
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        row, token = ref[i - 1], ids[i]
        best = row.topk(k).indices.tolist()
        assert list(got[i]) == list(dict.fromkeys(str(t) for t in [token, *best]))
        entry = got[i][str(token)]
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry["rank"] == int((row >= row[token]).sum()) and entry["decoded_token"] == tokenizer.decode([token])
        for rank, alt in enumerate(best, start=1):
            if alt != token:
                assert got[i][str(alt)]["rank"] == rank


def test_prompt_logprobs_on_completions(http: httpx.Client, tokenizer: Any, forward: Any) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    reply = post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 3})
    assert "logprobs" in reply["choices"][0] and reply["choices"][0]["logprobs"] is None
    assert_vllm_shape(reply["choices"][0]["prompt_logprobs"], ids, forward(ids), 3, tokenizer)
    plain = post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert "prompt_logprobs" not in plain["choices"][0] and plain["choices"][0]["text"] == reply["choices"][0]["text"]


def test_prompt_logprobs_on_chat(http: httpx.Client, tokenizer: Any, forward: Any) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply = post(http, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0})
    assert_vllm_shape(reply["prompt_logprobs"], ids, forward(ids), 0, tokenizer)
    assert "prompt_logprobs" not in reply["choices"][0]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": True}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1, "echo": True}, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_values_are_refused_by_name(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    response = http.post(path, json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param

"""Speculative decoding through the API: SmolLM2 served twice, with n-gram speculation and without, answers the
official OpenAI client the same text, usage, stops and logprobs, and the spec_decode metrics count what it did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import Server, start_server, write_registry

pytestmark = pytest.mark.slow

CODE = '''def parse_config(path):
    """Read a config file and return a dict."""
    result = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            result[key.strip()] = value.strip()
    return result
'''
QUOTING = f"Rewrite this Python code, renaming parse_config to read_config. Output only the code.\n\n{CODE}"
LISTING = "\n".join(
    f"{i}. {fruit}: {i * 3} crates, aisle {chr(65 + i)}"
    for i, fruit in enumerate(
        ["apple", "banana", "cherry", "damson", "elderberry", "fig", "grape", "huckleberry", "kiwi", "lime"], 1
    )
)
MODELS = ("spec", "plain")
MESSAGES = [ChatCompletionUserMessageParam(role="user", content=QUOTING)]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("spec")
    common: dict[str, Any] = {"source": str(smollm2_dir), "dtype": "float32", "kv_cache_memory": "64MiB", "threads": 1}
    entries = [
        {"name": "spec", "speculative": {"method": "ngram", "num_tokens": 4}, **common},
        {"name": "plain", "speculative": {"method": "none"}, **common},
    ]
    server = start_server(write_registry(tmp / "models.yaml", entries), tmp, "--metrics-open")
    yield server
    assert server.stop() == 0


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def spec_counts(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("tokenmill_spec_decode") and sample.labels.get("model_name") == "spec":
                key = sample.name + "".join(f"[{v}]" for k, v in sample.labels.items() if k == "position")
                counts[key] = sample.value
    return counts


def chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=80, temperature=0, **kwargs)


def test_a_quoting_answer_is_the_same_and_proposals_were_kept(server: Server, client: openai.OpenAI) -> None:
    before = spec_counts(server)
    prompt = f"{LISTING}\n{LISTING}\n{LISTING[:60]}"
    spec, plain = (client.completions.create(model=m, prompt=prompt, max_tokens=80, temperature=0) for m in MODELS)
    assert spec.choices[0].text == plain.choices[0].text
    assert spec.choices[0].text.count(" crates, aisle ") >= 4  # it goes on in the listing's own words
    assert spec.usage is not None and plain.usage is not None
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    after = spec_counts(server)
    drafts = after["tokenmill_spec_decode_num_drafts_total"] - before.get("tokenmill_spec_decode_num_drafts_total", 0)
    kept = after["tokenmill_spec_decode_num_accepted_tokens_total"] - before.get(
        "tokenmill_spec_decode_num_accepted_tokens_total", 0
    )
    assert drafts > 0
    assert kept >= spec.usage.completion_tokens / 4, "a listing in the prompt's own words keeps many proposed tokens"
    per_position = [after[f"tokenmill_spec_decode_num_accepted_tokens_per_pos_total[{i}]"] for i in range(4)]
    assert per_position == sorted(per_position, reverse=True)  # a token is kept only after those before it
    assert sum(per_position) == after["tokenmill_spec_decode_num_accepted_tokens_total"]


def test_a_stream_with_logprobs_and_a_stop_string_is_the_same(client: openai.OpenAI) -> None:
    def streamed(model: str) -> tuple[str, list[Any], str | None]:
        text, finish = "", None
        logprobs: list[Any] = []
        stream = chat(client, model, stream=True, logprobs=True, top_logprobs=2, stop=["line.split"])
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            logprobs += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            finish = choice.finish_reason or finish
        return text, logprobs, finish

    spec, plain = streamed("spec"), streamed("plain")
    assert spec[0] == plain[0] and spec[2] == plain[2] == "stop"
    assert "line.split" not in spec[0]
    assert [item.token for item in spec[1]] == [item.token for item in plain[1]]
    assert [item.logprob for item in spec[1]] == pytest.approx([item.logprob for item in plain[1]], abs=1e-4)
    assert all(len(item.top_logprobs) == 2 for item in spec[1])


def test_seeded_sampling_repeats_with_speculation(client: openai.OpenAI) -> None:
    def sampled() -> str:
        reply = client.chat.completions.create(model="spec", messages=MESSAGES, max_tokens=40, temperature=0.7, seed=42)
        return reply.choices[0].message.content or ""

    assert sampled() == sampled()

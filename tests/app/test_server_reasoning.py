"""Reasoning output through the HTTP API and the official OpenAI client, with a tiny model whose chat template opens
`<think>` in the generation prompt unless `enable_thinking` is false (as Qwen3's does). A random model writes random
text, so a regex shapes each reply as thinking, `</think>`, answer: the thinking goes to reasoning_content (and
reasoning), the rest to content, streamed and not alike. chat_template_kwargs reach the template; a forced tool call,
which would constrain the thinking, is refused."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

THINKING_TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}
{%- endif %}"""

SHAPED: Any = {"structured_outputs": {"regex": "[a-z][a-z ]{0,15}</think>[a-z]{1,12}"}}
ASK: Any = [{"role": "user", "content": "What is the capital of France?"}]
OFF: Any = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """'tiny-think' splits its replies (auto: its template writes <think>); 'tiny-raw' is the same with
    reasoning_parser none."""
    tmp = tmp_path_factory.mktemp("reasoning")
    (tmp / "think.jinja").write_text(THINKING_TEMPLATE)
    config = LlamaConfig(**{**tiny_config_kwargs(tiny_tokenizer), "max_position_embeddings": 4096})
    model_dir = save_tiny_model(LlamaForCausalLM, config, tiny_tokenizer, tmp / "tiny-llama-4k")
    common = {"source": str(model_dir), "dtype": "float32", "kv_cache_memory": "32MiB"}
    template = str(tmp / "think.jinja")
    entries = [
        {"name": "tiny-think", "chat_template": template, **common},
        {"name": "tiny-raw", "chat_template": template, "reasoning_parser": "none", **common},
    ]
    server = start_server(write_registry(tmp / "models.yaml", entries), tmp)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def create(client: openai.OpenAI, extra: dict[str, Any], **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny-think", "messages": ASK, "max_tokens": 60, "temperature": 0, **kwargs}
    return client.chat.completions.create(extra_body=extra, **args)


def streamed(client: openai.OpenAI, extra: dict[str, Any], **kwargs: Any) -> tuple[str, str, str, str | None]:
    """reasoning_content, reasoning and content joined from the deltas, and the finish reason."""
    reasoning_content, reasoning, content, finish = "", "", "", None
    for chunk in create(client, extra, stream=True, **kwargs):
        for choice in chunk.choices:
            extras = choice.delta.model_extra or {}
            assert extras.get("reasoning_content") == extras.get("reasoning")
            reasoning_content += extras.get("reasoning_content") or ""
            reasoning += extras.get("reasoning") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning_content, reasoning, content, finish


def test_thinking_and_answer_are_split_whole_and_streamed(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = create(client, SHAPED, temperature=1, seed=seed)
        message = reply.choices[0].message
        thought = (message.model_extra or {})["reasoning_content"]
        assert re.fullmatch("[a-z][a-z ]{0,15}", thought), thought
        assert message.model_extra["reasoning"] == thought
        assert message.content and re.fullmatch("[a-z]{1,12}", message.content)
        assert reply.choices[0].finish_reason == "stop"
        again = streamed(client, SHAPED, temperature=1, seed=seed)
        assert again == (thought, thought, message.content, "stop")


def test_chat_template_kwargs_turn_thinking_off(client: openai.OpenAI) -> None:
    on = create(client, {"structured_outputs": {"regex": "[a-z]{1,12}"}})
    off = create(client, {"structured_outputs": {"regex": "[a-z]{1,12}"}, **OFF})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the template closed an empty <think></think> block
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.choices[0].message.content and re.fullmatch("[a-z]{1,12}", off.choices[0].message.content)
    # with the thinking on, output that never closes it is all thinking
    assert on.choices[0].message.content is None
    assert re.fullmatch("[a-z]{1,12}", (on.choices[0].message.model_extra or {})["reasoning_content"])
    # a prompt that did not open the thinking: output that opens it is thinking until </think>
    opened = create(client, {"guided_regex": "<think>[a-z]{1,8}</think>[a-z]{1,8}", **OFF})
    assert re.fullmatch("[a-z]{1,8}", opened.choices[0].message.model_extra["reasoning_content"])
    assert opened.choices[0].message.content and "think" not in opened.choices[0].message.content


def test_a_model_without_a_reasoning_parser_returns_the_raw_text(client: openai.OpenAI) -> None:
    reply = create(client, SHAPED, model="tiny-raw")
    assert "</think>" in (reply.choices[0].message.content or "")
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})


def test_a_forced_tool_call_is_refused_while_the_model_thinks(server: Server) -> None:
    """A JSON answer format applies after the thinking instead (`test_server_thinking_apis`)."""
    fields = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"}
    param = "tool_choice"
    body = {"model": "tiny-think", "messages": ASK, "max_tokens": 8, **fields}
    with server.client() as http:
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and "enable_thinking" in error["message"]
        assert http.post("/v1/chat/completions", json={**body, **OFF}).status_code == 200


@pytest.mark.parametrize(
    "kwargs", [["enable_thinking"], "enable_thinking=false", {"messages": []}, {"add_generation_prompt": False}]
)
def test_bad_chat_template_kwargs_are_refused(server: Server, kwargs: Any) -> None:
    body = {"model": "tiny-think", "messages": ASK, "max_tokens": 8, "chat_template_kwargs": kwargs}
    with server.client() as http:
        refused = http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "chat_template_kwargs"


def test_chat_template_kwargs_reach_the_template(server: Server) -> None:
    """A variable the template reads changes the prompt, seen in the token count of the reply's usage."""
    body = {"model": "tiny-raw", "messages": ASK, "max_tokens": 1, "guided_regex": "[a-z]"}
    with server.client() as http:
        counts = [
            http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": kwargs}).json()["usage"]
            for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False})
        ]
    assert counts[0]["prompt_tokens"] == counts[1]["prompt_tokens"] < counts[2]["prompt_tokens"]

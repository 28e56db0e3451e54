"""A thinking model's thinking through Anthropic's Messages API and OpenAI's Responses API, with the official SDKs
against a real server: thinking blocks and reasoning items, whole and streamed, thinking turned off, thinking sent
back in later turns, and bad values refused in each API's error shape.

The model is a tiny Llama wired as a bigram table (attention and MLP outputs zeroed, so each next token depends on
the current one only): after the generation prompt's `<think>\\n` it writes `The quick</think>Hello!` and stops;
after a prompt that closed the thinking (`enable_thinking` false) it writes `Hello!`. Every reply is known exactly.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import torch
from openai.types.responses import ResponseOutputMessage, ResponseReasoningItem
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.app.chat_server import typed_events
from tests.conftest import build_tiny_tokenizer, tiny_config_kwargs
from tests.server_harness import Server, start_server, write_registry

# Renders an assistant turn's reasoning_content (as Qwen3's template does for the turns it keeps), and opens the
# thinking in the generation prompt unless enable_thinking is false, where it writes an empty, closed one.
TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}\
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>{% else %}<think>
{% endif %}
{%- endif %}"""

THOUGHT, ANSWER = "The quick", "Hello!"
THOUGHT_TOKENS = 4  # 'The', ' qu', 'ick', '</think>'
ASK: Any = [{"role": "user", "content": "Say hello."}]
ENABLED: Any = {"type": "enabled", "budget_tokens": 1024}
TIMEOUT = 120


def bigram_model(tokenizer: PreTrainedTokenizerFast, chain: list[int], directory: Path) -> Path:
    """A model that, at each token of `chain`, writes the next one (greedy or sampled: its logit leads by 80)."""
    config = LlamaConfig(**{**tiny_config_kwargs(tokenizer), "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (current, following) in enumerate(itertools.pairwise(chain)):
            model.model.embed_tokens.weight[current] = 0.0
            model.model.embed_tokens.weight[current, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """'tiny-think' splits its replies (auto: its template writes <think>); 'tiny-raw' is the same model with
    reasoning_parser none."""
    tmp = tmp_path_factory.mktemp("thinking-apis")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    newline, close = tokenizer.encode("\n")[0], tokenizer.convert_tokens_to_ids("</think>")
    thought, answer = tokenizer.encode(THOUGHT), tokenizer.encode(ANSWER)
    assert len(thought) + 1 == THOUGHT_TOKENS
    chain = [newline, *thought, close, *answer, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain)  # a token the chain met twice would loop
    model_dir = bigram_model(tokenizer, chain, tmp / "bigram")
    (tmp / "think.jinja").write_text(TEMPLATE)
    common = {"source": str(model_dir), "chat_template": str(tmp / "think.jinja"), "dtype": "float32"}
    entries = [
        {"name": "tiny-think", **common, "kv_cache_memory": "32MiB"},
        {"name": "tiny-raw", "reasoning_parser": "none", **common, "kv_cache_memory": "32MiB"},
    ]
    server = start_server(write_registry(tmp / "models.yaml", entries), tmp)
    yield server
    assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=TIMEOUT) as client:
        yield client


def message(claude: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    args: dict[str, Any] = {"model": "tiny-think", "messages": ASK, "max_tokens": 2048, **kwargs}
    return claude.messages.create(**args)


def blocks(reply: anthropic.types.Message) -> list[tuple[str, str]]:
    """Each block's type and text (a thinking block's thinking)."""
    out = []
    for block in reply.content:
        if block.type == "thinking":
            out.append(("thinking", block.thinking))
        elif block.type == "text":
            out.append(("text", block.text))
        else:
            out.append((block.type, ""))
    return out


# --- Messages ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [ENABLED, {"type": "adaptive"}])
def test_a_thinking_block_comes_before_the_text(claude: anthropic.Anthropic, thinking: Any) -> None:
    reply = message(claude, thinking=thinking)
    assert blocks(reply) == [("thinking", THOUGHT), ("text", ANSWER)]
    first = reply.content[0]
    assert isinstance(first, anthropic.types.ThinkingBlock)
    assert re.fullmatch(r"tm1[A-Za-z0-9_-]{43}", first.signature)
    assert message(claude, thinking=thinking).content[0] == first  # the same thinking, the same signature
    assert reply.stop_reason == "end_turn"
    assert reply.usage.output_tokens == THOUGHT_TOKENS + 4  # 'Hel', 'lo', '!', and the end of the turn


def test_a_streamed_thinking_block_is_the_whole_one(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    whole = message(claude, thinking=ENABLED)
    with claude.messages.stream(model="tiny-think", messages=ASK, max_tokens=2048, thinking=ENABLED) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert streamed.content[0] == whole.content[0] and blocks(streamed) == blocks(whole)
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert "thinking" in kinds and "signature" in kinds  # the SDK's own events for thinking_delta, signature_delta
    body = {"model": "tiny-think", "messages": ASK, "max_tokens": 2048, "thinking": ENABLED}
    events = typed_events(http, "/v1/messages", body)
    shape = [
        (e["type"], (e.get("content_block") or e.get("delta") or {}).get("type"))
        for e in events
        if e["type"].startswith("content_block")
    ]
    first_text = shape.index(("content_block_start", "text"))
    assert shape[0] == ("content_block_start", "thinking")
    assert {kind for kind in shape[1 : first_text - 2]} == {("content_block_delta", "thinking_delta")}
    assert shape[first_text - 2 : first_text] == [
        ("content_block_delta", "signature_delta"),
        ("content_block_stop", None),
    ]
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    indexes = [e["index"] for e in events if e["type"].startswith("content_block")]
    assert indexes == [0] * first_text + [1] * (len(indexes) - first_text)


def test_display_omitted_keeps_the_signature_not_the_text(claude: anthropic.Anthropic) -> None:
    shown = message(claude, thinking=ENABLED).content[0]
    omitted: Any = {**ENABLED, "display": "omitted"}
    hidden = message(claude, thinking=omitted).content[0]
    assert isinstance(shown, anthropic.types.ThinkingBlock) and isinstance(hidden, anthropic.types.ThinkingBlock)
    assert hidden.thinking == "" and hidden.signature == shown.signature
    with claude.messages.stream(model="tiny-think", messages=ASK, max_tokens=2048, thinking=omitted) as stream:
        assert stream.get_final_message().content[0] == hidden


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_thinking_off_turns_it_off_in_the_template(claude: anthropic.Anthropic, thinking: Any) -> None:
    reply = message(claude, **({"thinking": thinking} if thinking else {}))
    assert blocks(reply) == [("text", ANSWER)]
    assert reply.usage.output_tokens == 4
    with claude.messages.stream(model="tiny-think", messages=ASK, max_tokens=64) as stream:
        assert blocks(stream.get_final_message()) == blocks(reply)


def test_a_reply_cut_while_thinking_is_all_thinking(claude: anthropic.Anthropic) -> None:
    reply = message(claude, thinking={"type": "adaptive"}, max_tokens=2)
    assert blocks(reply) == [("thinking", "The qu")] and reply.stop_reason == "max_tokens"
    with claude.messages.stream(model="tiny-think", messages=ASK, max_tokens=2, thinking={"type": "adaptive"}) as s:
        assert blocks(s.get_final_message()) == blocks(reply)


def test_a_model_without_a_reasoning_parser_keeps_the_raw_text(claude: anthropic.Anthropic) -> None:
    reply = message(claude, model="tiny-raw", thinking=ENABLED)
    assert blocks(reply) == [("text", f"{THOUGHT}</think>{ANSWER}")]


def test_thinking_blocks_sent_back_reach_the_template(claude: anthropic.Anthropic) -> None:
    first = message(claude, thinking=ENABLED)
    turns: Any = [*ASK, {"role": "assistant", "content": first.content}, {"role": "user", "content": "Again."}]
    reply = message(claude, messages=turns, thinking=ENABLED)
    assert blocks(reply) == [("thinking", THOUGHT), ("text", ANSWER)]
    without: Any = [*ASK, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Again."}]
    redacted: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": ANSWER}],
        },
        {"role": "user", "content": "Again."},
    ]

    def counted(messages: Any, thinking: Any = ENABLED) -> int:
        return claude.messages.count_tokens(model="tiny-think", messages=messages, thinking=thinking).input_tokens

    # the template renders the thinking sent back as <think>The quick</think> before the answer
    assert counted(turns) == counted(without) + THOUGHT_TOKENS + 1
    assert counted(redacted) == counted(without)  # redacted thinking is left out
    assert reply.usage.input_tokens == counted(turns)
    # thinking off: the generation prompt closes an empty <think></think> ('\n', '\n', '</think>' for '\n')
    assert counted(ASK, {"type": "disabled"}) == counted(ASK) + 2


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"thinking": {"type": "between_tools"}}, "thinking.type"),
        ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking"),
        (
            {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]}]},
            "messages.0.content.0",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]},
                    {"role": "user", "content": "Again."},
                ]
            },
            "signature",
        ),
    ],
)
def test_bad_thinking_is_refused_in_anthropics_shape(
    claude: anthropic.Anthropic, http: httpx.Client, fields: dict[str, Any], where: str
) -> None:
    body = {"model": "tiny-think", "messages": ASK, "max_tokens": 2048, **fields}
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(**body)
    assert refused.value.status_code == 400
    error: Any = refused.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert where in error["error"]["message"], error
    raw = http.post("/v1/messages", json={**body, "stream": True})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


# --- Responses -----------------------------------------------------------------------------------------------------


def respond(oai: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny-think", "input": "Say hello.", "max_output_tokens": 64, **kwargs}
    return oai.responses.create(**args)


@pytest.mark.parametrize("reasoning", [None, {"effort": "high", "summary": "auto"}])
def test_a_reasoning_item_comes_before_the_message(oai: openai.OpenAI, reasoning: Any) -> None:
    response = respond(oai, **({"reasoning": reasoning} if reasoning else {}))
    assert [item.type for item in response.output] == ["reasoning", "message"]
    item, said = response.output
    assert isinstance(item, ResponseReasoningItem) and isinstance(said, ResponseOutputMessage)
    assert item.id.startswith("rs_") and item.status == "completed" and item.summary == []
    assert [(part.type, part.text) for part in item.content or []] == [("reasoning_text", THOUGHT)]
    assert response.output_text == ANSWER and response.status == "completed"
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == THOUGHT_TOKENS
    assert response.usage.output_tokens == THOUGHT_TOKENS + 4
    if reasoning:
        assert response.reasoning is not None and response.reasoning.effort == "high"


def test_a_streamed_reasoning_item_is_the_whole_one(oai: openai.OpenAI) -> None:
    whole = respond(oai)
    with oai.responses.stream(model="tiny-think", input="Say hello.", max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert final.output[0].model_dump(exclude={"id"}) == whole.output[0].model_dump(exclude={"id"})
    assert final.output_text == whole.output_text and len(final.output) == 2
    assert final.usage == whole.usage
    items = [kind for kind in kinds if "reasoning" in kind or kind.startswith("response.output_item")]
    assert [kind for at, kind in enumerate(items) if at == 0 or items[at - 1] != kind] == [
        "response.output_item.added",  # the reasoning item
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",  # the message
        "response.output_item.done",
    ]
    deltas = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert deltas == THOUGHT
    parts = [event for event in events if event.type == "response.content_part.added"]
    assert [part.part.type for part in parts] == ["reasoning_text", "output_text"]


def test_effort_none_turns_thinking_off(oai: openai.OpenAI) -> None:
    response = respond(oai, reasoning={"effort": "none"})
    assert [item.type for item in response.output] == ["message"] and response.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    with oai.responses.stream(
        model="tiny-think", input="Say hello.", max_output_tokens=64, reasoning={"effort": "none"}
    ) as stream:
        assert [item.type for item in stream.get_final_response().output] == ["message"]


def test_a_response_cut_while_thinking_ends_with_its_reasoning(oai: openai.OpenAI) -> None:
    response = respond(oai, max_output_tokens=2)
    assert response.status == "incomplete" and [item.type for item in response.output] == ["reasoning"]
    item = response.output[0]
    assert isinstance(item, ResponseReasoningItem) and item.status == "incomplete"
    assert [part.text for part in item.content or []] == ["The qu"]
    assert response.usage.output_tokens_details.reasoning_tokens == 2
    with oai.responses.stream(model="tiny-think", input="Say hello.", max_output_tokens=2) as stream:
        streamed = next(event.response for event in stream if event.type == "response.incomplete")
    assert streamed.status == "incomplete"
    assert streamed.output[0].model_dump(exclude={"id"}) == item.model_dump(exclude={"id"})


def test_reasoning_items_sent_back_reach_the_template(oai: openai.OpenAI) -> None:
    first = respond(oai)
    back = [item.model_dump(exclude_none=True) for item in first.output]
    again = respond(
        oai, input=[{"role": "user", "content": "Say hello."}, *back, {"role": "user", "content": "Again."}]
    )
    without = respond(
        oai,
        input=[{"role": "user", "content": "Say hello."}, back[1], {"role": "user", "content": "Again."}],
    )
    assert again.output_text == ANSWER
    assert again.usage.input_tokens == without.usage.input_tokens + THOUGHT_TOKENS + 1
    # a reasoning item that no assistant turn follows is left out
    dangling = respond(oai, input=[{"role": "user", "content": "Say hello."}, back[0]])
    assert dangling.usage.input_tokens == respond(oai).usage.input_tokens


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"reasoning": {"summary": "long"}}, "reasoning.summary"),
        ({"reasoning": {"effort": "low", "colour": "blue"}}, "reasoning.colour"),
        ({"input": [{"type": "reasoning", "summary": [], "content": [{"type": "text", "text": "x"}]}]}, "input.0"),
    ],
)
def test_bad_reasoning_is_refused_in_openais_shape(oai: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    body = {"model": "tiny-think", "input": "Say hello.", **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        oai.responses.create(**body)
    error: Any = refused.value.body
    assert refused.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error


def test_a_forced_tool_call_while_thinking_is_refused(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    """A forced call's grammar would constrain the thinking too (as on chat completions, and as Anthropic refuses
    tool_choice any or tool with thinking on); with thinking off it runs."""
    tools: Any = [{"name": "f", "input_schema": {"type": "object"}}]
    body: Any = {"model": "tiny-think", "messages": ASK, "max_tokens": 2048, "tools": tools, "thinking": ENABLED}
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(**body, tool_choice={"type": "any"})
    error: Any = refused.value.body
    assert error["error"]["type"] == "invalid_request_error"
    assert "tool_choice" in error["error"]["message"] and '"disabled"' in error["error"]["message"]
    off = {**body, "thinking": {"type": "disabled"}, "tool_choice": {"type": "any"}, "max_tokens": 16}
    assert http.post("/v1/messages", json=off).status_code == 200


def test_an_answer_format_applies_after_the_reasoning(oai: openai.OpenAI) -> None:
    """text.format (and chat completions' response_format) shapes the answer, not the thinking: the model thinks as
    it would, and after </think> the grammar holds it to JSON, where it would have said something else."""
    text: Any = {"format": {"type": "json_object"}}
    response = respond(oai, text=text, max_output_tokens=THOUGHT_TOKENS + 6)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert [part.text for part in response.output[0].content or []] == [THOUGHT]
    assert response.output_text.startswith("{") and ANSWER not in response.output_text
    chat = oai.chat.completions.create(
        model="tiny-think",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=THOUGHT_TOKENS + 6,
        response_format={"type": "json_object"},
    )
    assert (chat.choices[0].message.model_extra or {}).get("reasoning_content") == THOUGHT
    assert (chat.choices[0].message.content or "").startswith("{")
    off = respond(oai, text=text, reasoning={"effort": "none"}, max_output_tokens=8)
    assert [item.type for item in off.output] == ["message"]
    assert off.output_text.startswith("{")

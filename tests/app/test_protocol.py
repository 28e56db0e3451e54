"""The OpenAI request types: every supported field parses and maps to sampling, anything else is refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.errors import APIError, from_validation_errors
from app.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from worker.messages import InvalidRequest, SamplingParams

USER = [{"role": "user", "content": "Hi"}]

FULL_CHAT: dict[str, Any] = {
    "model": "smollm2",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Rules"}, {"type": "text", "text": "apply"}]},
        {"role": "user", "content": "What is 2+2?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "4", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "4", "refusal": None, "annotations": []},
    ],
    "max_completion_tokens": 50,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["\n\n", "END"],
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"42": -100, "7": 2.5},
    "logprobs": True,
    "top_logprobs": 3,
    "user": "user-1",
    "timeout": 30,
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "ignore_eos": True,
    "min_tokens": 2,
    "stop_token_ids": [5, 6],
}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER} | fields)


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "Once"} | fields)


def rejection(model: type[ChatCompletionRequest | CompletionRequest], body: dict[str, Any]) -> APIError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return from_validation_errors(caught.value.errors())


# --- requests ----------------------------------------------------------------------------------------------------


def test_chat_request_with_every_field() -> None:
    request = ChatCompletionRequest.model_validate(FULL_CHAT)
    assert request.stop_strings == ["\n\n", "END"] and request.include_usage and request.timeout == 30.0
    assert [message.text() for message in request.messages] == [
        "Be brief.",
        "Rules\napply",
        "What is 2+2?",
        "",
        "4",
        "4",
    ]
    assert request.messages[1].to_template() == {"role": "system", "content": "Rules\napply"}
    assert request.messages[2].to_template() == {"role": "user", "content": "What is 2+2?", "name": "ann"}
    assert request.messages[3].to_template()["tool_calls"][0]["function"] == {"name": "add", "arguments": {}}
    assert request.messages[4].to_template() == {"role": "tool", "content": "4", "tool_call_id": "call_1"}
    assert request.to_sampling_params(default_max_tokens=1000) == SamplingParams(
        max_tokens=50,
        min_tokens=2,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={42: -100.0, 7: 2.5},
        seed=7,
        logprobs=3,
        stop_token_ids=[5, 6],
        ignore_eos=True,
    )


def test_chat_defaults_map_to_openai_defaults() -> None:
    request = chat()
    assert (request.n, request.stream, request.stop_strings, request.include_usage) == (1, False, [], False)
    assert request.to_sampling_params(default_max_tokens=123) == SamplingParams(max_tokens=123)


@pytest.mark.parametrize(
    ("fields", "logprobs"),
    [({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 20}, 20)],
)
def test_chat_logprobs_map_to_the_number_of_alternatives(fields: dict[str, Any], logprobs: int | None) -> None:
    assert chat(**fields).to_sampling_params(16).logprobs == logprobs


def test_max_tokens_is_the_older_name_of_max_completion_tokens() -> None:
    assert chat(max_tokens=9).to_sampling_params(100).max_tokens == 9
    assert chat(max_tokens=9, max_completion_tokens=9).to_sampling_params(100).max_tokens == 9
    assert (
        rejection(
            ChatCompletionRequest, {"model": "m", "messages": USER, "max_tokens": 9, "max_completion_tokens": 8}
        ).param
        == "max_completion_tokens"
    )


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("Once", ["Once"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_shapes(prompt: Any, prompts: list[Any]) -> None:
    assert completion(prompt=prompt).prompts() == prompts


def test_completion_request_with_every_field() -> None:
    request = completion(
        max_tokens=5,
        logprobs=2,
        echo=True,
        best_of=2,
        n=2,
        stop="\n",
        suffix=None,
        stream=True,
        stream_options={"include_usage": False},
        top_k=-1,
    )
    assert request.echo and request.stop_strings == ["\n"] and not request.include_usage
    params = request.to_sampling_params(default_max_tokens=100)
    assert (params.max_tokens, params.logprobs, params.top_k) == (5, 2, -1)


def test_completion_max_tokens_defaults_to_16_and_null_means_the_server_default() -> None:
    assert completion().to_sampling_params(100).max_tokens == 16
    assert completion(max_tokens=None).to_sampling_params(100).max_tokens == 100


def test_scoring_asks_the_engine_for_prompt_logprobs() -> None:
    """echo with logprobs scores the prompt's tokens too; prompt_logprobs asks for vLLM's; the engine computes the
    larger of the two and each answer keeps its own number of alternatives."""
    score = completion(echo=True, logprobs=2, max_tokens=0).to_sampling_params(100)
    assert (score.max_tokens, score.logprobs, score.prompt_logprobs) == (0, 2, 2)
    assert completion(logprobs=2).to_sampling_params(100).prompt_logprobs is None
    assert completion(echo=True, logprobs=1, prompt_logprobs=4).to_sampling_params(100).prompt_logprobs == 4
    assert chat(prompt_logprobs=3).to_sampling_params(100).prompt_logprobs == 3


def test_tokenize_and_detokenize_requests() -> None:
    by_prompt = TokenizeRequest.model_validate({"model": "m", "prompt": "hi"})
    by_messages = TokenizeRequest.model_validate({"messages": USER, "add_generation_prompt": False})
    assert (by_prompt.special_tokens, by_messages.special_tokens, by_messages.add_generation_prompt) == (
        True,
        False,
        False,
    )
    assert DetokenizeRequest.model_validate({"model": "m", "tokens": [1, 2]}).tokens == [1, 2]
    for body in ({"model": "m"}, {"prompt": "a", "messages": USER}, {"prompt": "a", "add_generation_prompt": True}):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "low"),
    ],
)
def test_unsupported_chat_fields_are_refused_by_name(field: str, value: Any) -> None:
    error = rejection(ChatCompletionRequest, {"model": "m", "messages": USER, field: value})
    assert (error.status, error.param, error.code) == (400, field, "unsupported_parameter")
    assert f"'{field}' is not supported" in error.message


@pytest.mark.parametrize("fields", [{"functions": []}, {"function_call": "none"}, {"store": False}, {"metadata": None}])
def test_chat_fields_that_ask_for_nothing_are_accepted(fields: dict[str, Any]) -> None:
    chat(**fields)


@pytest.mark.parametrize(("field", "value"), [("suffix", "tail"), ("best_of", 3)])
def test_unsupported_completion_fields_are_refused_by_name(field: str, value: Any) -> None:
    assert rejection(CompletionRequest, {"model": "m", "prompt": "x", field: value}).param == field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": [{"role": "tool", "content": "4"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_invalid_chat_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    error = rejection(ChatCompletionRequest, {"model": "m", "messages": USER} | body)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


def test_unknown_fields_get_openais_message() -> None:
    error = rejection(CompletionRequest, {"model": "m", "prompt": "x", "frobnicate": 1})
    assert (error.message, error.code) == ("Unrecognized request argument supplied: frobnicate", "unknown_parameter")


@pytest.mark.parametrize("prompt", [5, [], [[]], [1, "a"], [-1], [[1], "a"], None])
def test_invalid_prompts_are_refused(prompt: Any) -> None:
    assert rejection(CompletionRequest, {"model": "m", "prompt": prompt}).param == "prompt"


@pytest.mark.parametrize("logprobs", [6, -1, True, 2.0])
def test_completion_logprobs_is_a_count_up_to_5(logprobs: Any) -> None:
    assert rejection(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": logprobs}).param == "logprobs"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1.5": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"temperature": 101}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ],
)
def test_out_of_range_sampling_raises_invalid_request(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat(**fields).to_sampling_params(default_max_tokens=100)
    assert caught.value.param == param

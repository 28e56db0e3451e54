"""Anthropic's `thinking` and thinking blocks in a Messages request, without a server: what the chat template gets."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.anthropic.protocol import MessagesRequest

ASK: Any = {"role": "user", "content": "Hi"}


def request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "messages": [ASK], "max_tokens": 2048, **fields})


@pytest.mark.parametrize(
    ("thinking", "thinks"),
    [
        (None, False),
        ({"type": "disabled"}, False),
        ({"type": "enabled", "budget_tokens": 1024}, True),
        ({"type": "adaptive", "display": "summarized"}, True),
    ],
)
def test_thinking_reaches_the_template_as_enable_thinking(thinking: Any, thinks: bool) -> None:
    body = request(thinking=thinking)
    assert body.thinks is thinks and body.template_kwargs() == {"enable_thinking": thinks}
    assert not body.omits_thinking


def test_thinking_blocks_become_reasoning_content() -> None:
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}
    turns = [
        ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "first", "signature": "s1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "second", "signature": "s2"},
                {"type": "text", "text": "Calling."},
                call,
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "2"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "only", "signature": "s3"}]},
        ASK,
    ]
    messages = request(messages=turns).template_messages()
    assert messages[1]["reasoning_content"] == "first\nsecond" and messages[1]["content"] == "Calling."
    assert messages[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert messages[3] == {"role": "assistant", "content": "", "reasoning_content": "only"}
    assert all("reasoning_content" not in m for m in (messages[0], messages[2], messages[4]))


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, ("thinking", "enabled", "budget_tokens")),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, ()),
        ({"thinking": {"type": "between_tools"}}, ("thinking",)),
        ({"messages": [{"role": "user", "content": [{"type": "redacted_thinking", "data": "x"}]}]}, ("messages",)),
    ],
)
def test_bad_thinking_is_refused(fields: dict[str, Any], location: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as refused:
        request(**fields)
    assert refused.value.errors()[0]["loc"][: len(location)] == location

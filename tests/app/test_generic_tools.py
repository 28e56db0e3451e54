"""The generic tool prompt for templates that teach no tools: which templates those are, and how a conversation
with tools, calls and results becomes one such a template renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from app.generic_tools import TOOL_PROMPT, has_tool_turns, teaches_tools, with_tool_prompt
from tests.app.test_server_tools import HERMES_TEMPLATE, TOOLS

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_which_templates_teach_tools(smollm2_dir: Path) -> None:
    assert teaches_tools(HERMES_TEMPLATE)
    assert teaches_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}")
    assert not teaches_tools(AutoTokenizer.from_pretrained(str(smollm2_dir)).chat_template)
    assert not teaches_tools(None)


def test_the_tools_join_the_system_message_or_open_the_conversation() -> None:
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    opened = with_tool_prompt(asked, TOOLS)
    assert [m["role"] for m in opened] == ["system", "user"]
    assert opened[0]["content"].startswith(TOOL_PROMPT.split("{tools}")[0])
    assert [
        json.loads(line) for line in opened[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    ] == TOOLS
    joined = with_tool_prompt([{"role": "system", "content": "Be brief."}, *asked], TOOLS)
    assert len(joined) == 2 and joined[0]["content"].startswith("Be brief.\n\nYou may call")
    assert asked == [{"role": "user", "content": "Weather in Paris?"}]  # the caller's list is left as it was


def test_calls_and_results_become_text_in_the_hermes_format() -> None:
    turn: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24 degrees"},
    ]
    assert has_tool_turns(turn) and not has_tool_turns(turn[:1])
    out = with_tool_prompt(turn, [])
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    results = "<tool_response>\n18 degrees\n</tool_response>\n<tool_response>\n24 degrees\n</tool_response>"
    assert out == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": f"{block}\n{block}"},
        {"role": "user", "content": results},
    ]

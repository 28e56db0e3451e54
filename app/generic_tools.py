"""Tools for a model whose chat template teaches none (SmolLM2's, many base and small instruct models'): the tools
are described in a generic system prompt in the Hermes format, as Ollama's templates do, and the conversation's
earlier calls and results are written as text in that format, so the template sees only roles and strings. The reply
is parsed as Hermes (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), and `tool_choice: required` or a named
function is still guaranteed by the forcing grammar, whatever the model would have written.

A template teaches tools when it reads the `tools` variable or writes a known call marker; an entry with
`tool_parser: none` refuses tools instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.tool_calls import ToolFormat, detect_format

GENERIC_FORMAT: ToolFormat = "hermes"

_READS_TOOLS = re.compile(r"\btools\b")

TOOL_PROMPT = """\
You may call one or more functions to help with the user's request. The functions you may call are given as JSON \
schemas within <tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments within <tool_call></tool_call> tags, \
one block a call:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>
A function's result comes back within <tool_response></tool_response> tags. When no function helps, answer \
normally."""


def teaches_tools(chat_template: str | None) -> bool:
    """Whether the chat template renders tool definitions or calls itself."""
    if not chat_template:
        return False
    return detect_format(chat_template) is not None or _READS_TOOLS.search(chat_template) is not None


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as a template without tools can render it: the tool prompt added to the system message (or
    first, as one), each assistant call written as a `<tool_call>` block after its text, and each run of tool results
    as one user message of `<tool_response>` blocks."""
    out: list[dict[str, Any]] = []
    previous = None
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = [_call_block(call["function"]) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [content, *blocks]))})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if previous == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({key: value for key, value in message.items() if key != "tool_call_id"})
        previous = role
    if tools:
        prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_block(function: dict[str, Any]) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"

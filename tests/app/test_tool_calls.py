"""The tool-call parser of each format: whole replies, the same replies fed piece by piece (every split), no markup
in the content, and the grammar that forces a call."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher

from app.tool_calls import ToolCallParser, ToolFormat, detect_format, forced_call_grammar

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}'
NOW = '{"name": "now", "arguments": {}}'
CASES: list[tuple[ToolFormat, str, str, list[tuple[str, str]]]] = [
    ("hermes", "Sure.\n<tool_call>\n" + WEATHER + "\n</tool_call>", "Sure.\n",
     [("get_weather", '{"city": "Paris", "days": [1, 2]}')]),
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n" + NOW + "\n</tool_call>",
     "", [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("now", "{}")]),
    ("hermes", "No tools needed: 2 < 3 and {braces} stay.", "No tools needed: 2 < 3 and {braces} stay.", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": \\"}\\"}"}\n</tool_call>', "",
     [("f", '{"a": "}"}')]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", '{"city": "Oslo"}')]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}', "", [("f", "{}")]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("hermes", 'Use <tool_call> tags: {"no": "name"}', 'Use <tool_call> tags: {"no": "name"}', []),
    ("llama3_json", "The answer is {x}.", "The answer is {x}.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": "b"}}, {"name": "g", "arguments": {}}]', "",
     [("f", '{"a": "b"}'), ("g", "{}")]),
    ("mistral", ' [{"name": "f", "arguments": {"q": "[x]"}}]', "", [("f", '{"q": "[x]"}')]),
    ("mistral", "[1, 2] are numbers.", "[1, 2] are numbers.", []),
]  # fmt: skip


def streamed(format: ToolFormat, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feed `text` in pieces; reassemble content and calls from the deltas as a client would."""
    parser = ToolCallParser(format)
    content = ""
    names: list[str] = []
    arguments: list[str] = []
    ids: list[str] = []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for piece, final in [*((p, False) for p in pieces), ("", True)]:
        got, deltas = parser.finish() if final else parser.feed(piece)
        content += got
        for delta in deltas:
            if delta.index == len(names):
                assert delta.id is not None and delta.name is not None, "a call's first delta names it"
                names.append(delta.name)
                arguments.append("")
                ids.append(delta.id)
            arguments[delta.index] += delta.arguments
    return content, list(zip(names, arguments, strict=True)), ids


@pytest.mark.parametrize(("format", "text", "content", "calls"), CASES)
def test_whole_replies(format: ToolFormat, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = ToolCallParser(format).parse_all(text)
    assert got_content == content
    assert [(call.name, call.arguments) for call in got_calls] == calls
    for call in got_calls:
        json.loads(call.arguments)


@pytest.mark.parametrize(("format", "text", "content", "calls"), CASES)
def test_any_split_streams_the_same(format: ToolFormat, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    for cut in range(1, len(text)):
        got_content, got_calls, _ = streamed(format, text, [cut])
        assert (got_content, got_calls) == (content, calls), f"split at {cut}"
    got_content, got_calls, _ = streamed(format, text, list(range(1, len(text))))
    assert (got_content, got_calls) == (content, calls)


def test_content_never_shows_a_partial_marker() -> None:
    parser = ToolCallParser("hermes")
    shown = ""
    for piece in ["Checking", " <tool", "_ca", "ll>\n", WEATHER[:10]]:
        content, _ = parser.feed(piece)
        shown += content
    assert shown == "Checking "


def test_arguments_stream_while_they_are_written() -> None:
    parser = ToolCallParser("hermes")
    _, first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert [(d.name, d.arguments) for d in first] == [("get_weather", '{"city": "Pa')]
    _, more = parser.feed('ris"}}\n</tool_call>')
    assert [(d.index, d.id, d.arguments) for d in more] == [(0, None, 'ris"}')]


def test_formats_are_recognised_in_chat_templates() -> None:
    assert detect_format("{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}") == "hermes"
    assert detect_format("[AVAILABLE_TOOLS]...[TOOL_CALLS]") == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|> parameters <|python_tag|>") == "llama3_json"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None


@pytest.mark.parametrize("format", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_call_grammars_are_valid(format: ToolFormat, parallel: bool) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "now"}},
    ]
    grammar = forced_call_grammar(format, tools, parallel, {})
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar)) == ""

"""Tool calls in a model's output: the formats chat templates teach, a parser that streams, and the grammar that
forces a call when `tool_choice` is `required` or names a function.

Formats (chosen by `tool_parser` in models.yaml, or recognised in the chat template):
- hermes (Hermes, Qwen 2/2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated.
- llama3_json (Llama 3.1+): a bare `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

The parser is incremental and stateless between feeds: it rescans the tool region on each piece of text, so a
streamed reply and the same reply parsed at once give the same calls by construction. A call's `arguments` is the
raw JSON text the model wrote for them, streamed as it grows.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class FormatSpec:
    marker: str  # where the tool region starts, anywhere in the output
    bare_start: str | None  # or this, at the very start of the output (when the marker is a special token and is
    # stripped from the text, or the model skips it)
    arguments_key: str


FORMATS: dict[ToolFormat, FormatSpec] = {
    "hermes": FormatSpec("<tool_call>", None, "arguments"),
    "llama3_json": FormatSpec("<|python_tag|>", "{", "parameters"),
    "mistral": FormatSpec("[TOOL_CALLS]", "[", "arguments"),
}


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The format a chat template teaches its model, if it teaches one."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or ("ipython" in chat_template and "parameters" in chat_template):
        return "llama3_json"
    return None


# --- what a reply holds ---------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, as the model wrote it


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, Any] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments or self.id is not None:
            function["arguments"] = self.arguments
        out["function"] = function
        return out


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# --- scanning -------------------------------------------------------------------------------------------------------


@dataclass
class _Scanned:
    name: str | None = None
    arguments: str = ""  # raw text of the arguments value so far
    arguments_string: bool = False  # the model wrote the arguments as a JSON string (decoded when complete)
    complete: bool = False


def _scan_region(region: str) -> tuple[list[_Scanned], bool]:
    """The calls in a tool region: each top-level JSON object is one. Returns them and whether the region is still
    plausible (False when a top-level object does not start with a "name" or arguments key)."""
    calls: list[_Scanned] = []
    i, n = 0, len(region)
    while i < n:
        if region[i] != "{":
            i += 1
            continue
        call, i, plausible = _scan_object(region, i)
        if not plausible:
            return calls, False
        calls.append(call)
    return calls, True


def _scan_string(text: str, start: int) -> tuple[str | None, int]:
    """A JSON string starting at text[start] == '"': its decoded value (None if unterminated) and the index after."""
    i, n = start + 1, len(text)
    while i < n:
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            try:
                return json.loads(text[start : i + 1]), i + 1
            except json.JSONDecodeError:
                return text[start + 1 : i], i + 1
        i += 1
    return None, n


def _skip_value(text: str, start: int) -> tuple[int, bool]:
    """Index after the JSON value starting at `start`, and whether it ended before the text did."""
    depth, i, n = 0, start, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            value, i = _scan_string(text, i)
            if value is None:
                return n, False
            if depth == 0:
                return i, True
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1, True
            if depth < 0:
                return i, True
        elif depth == 0 and ch in ",}\n":
            return i, True
        i += 1
    return n, False


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _scan_object(text: str, start: int) -> tuple[_Scanned, int, bool]:
    """One call object at text[start] == '{': its fields so far, the index after it, and whether it looks like a
    call (its first key is the name or the arguments)."""
    call = _Scanned()
    i, n, first = start + 1, len(text), True
    while True:
        i = _skip_ws(text, i)
        if i >= n:
            return call, n, True
        if text[i] == "}":
            call.complete = True
            return call, i + 1, True
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return call, i, not first
        key, i = _scan_string(text, i)
        if key is None:
            return call, n, True  # the key itself is still arriving
        if first and key != "name" and key not in ARGUMENT_KEYS:
            return call, i, False
        first = False
        i = _skip_ws(text, i)
        if i >= n:
            return call, n, True
        if text[i] != ":":
            return call, i, False
        i = _skip_ws(text, i + 1)
        if i >= n:
            return call, n, True
        if key == "name" and text[i] == '"':
            name, i = _scan_string(text, i)
            call.name = name
            if name is None:
                return call, n, True
        elif key in ARGUMENT_KEYS:
            end, closed = _skip_value(text, i)
            call.arguments = text[i:end]
            call.arguments_string = text[i] == '"'
            if not closed:
                return call, n, True
            i = end
        else:
            end, closed = _skip_value(text, i)
            if not closed:
                return call, n, True
            i = end


# --- the parser -----------------------------------------------------------------------------------------------------


@dataclass
class ToolCallParser:
    """Feed the reply's text as it arrives; get content and tool-call deltas back. `finish` flushes."""

    format: ToolFormat
    text: str = ""
    content_sent: int = 0  # characters of `text` sent as content
    region_start: int | None = None  # index in `text` where the tool region's JSON begins
    content_end: int | None = None  # index in `text` where the content ends (the marker, or the bare call)
    bare_undecided: bool = True  # at the start of the output, while it may still be a bare tool call
    calls: list[ToolCall] = field(default_factory=list)

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.format]

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        if self.region_start is None:
            self._find_region()
        content = self._release_content(final=False)
        return content, self._call_deltas(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The rest: held-back content, and the last arguments (decoded, for string-valued ones)."""
        if self.region_start is None:
            self.bare_undecided = False
        content = self._release_content(final=True)
        deltas = self._call_deltas(final=True)
        if self.region_start is not None and not self.calls:  # a marker, but no call in it: the text is content
            content += self.text[self.content_sent :]
            self.content_sent = len(self.text)
        return content, deltas

    def parse_all(self, text: str) -> tuple[str, list[ToolCall]]:
        """Parse a whole reply: its content and its calls (as a streamed reply would have given them)."""
        content, _ = self.feed(text)
        rest, _ = self.finish()
        return content + rest, self.calls

    # --- internals ---

    def _find_region(self) -> None:
        spec = self.spec
        if self.bare_undecided and spec.bare_start is not None:
            head = self.text.lstrip()
            if not head:
                return
            body = head[len(spec.bare_start) :].lstrip() if spec.bare_start == "[" else head
            if head.startswith(spec.bare_start) and (not body or body.startswith("{")):
                calls, plausible = _scan_region(body)
                if plausible and not (calls and calls[0].name is not None):
                    return  # it may still be a call: hold the text
                if plausible:  # a bare call: the whitespace before it is not content
                    self.region_start, self.content_end = len(self.text) - len(head), self.content_sent
                    self.bare_undecided = False
                    return
            self.bare_undecided = False
        marker = self.text.find(spec.marker, self.content_sent)
        if marker >= 0:
            self.content_end = marker
            self.region_start = marker + len(spec.marker)

    def _release_content(self, final: bool) -> str:
        """Content is what comes before the region; hold back what may be the start of the marker or a bare call."""
        if self.content_end is not None:
            end = self.content_end
        elif final:
            end = len(self.text)
        elif self.bare_undecided and self.spec.bare_start is not None:
            end = self.content_sent
        else:
            end = len(self.text) - partial_marker(self.text, self.spec.marker)
        end = max(end, self.content_sent)
        content, self.content_sent = self.text[self.content_sent : end], end
        return content

    def _call_deltas(self, final: bool) -> list[ToolCallDelta]:
        if self.region_start is None:
            return []
        scanned, _ = _scan_region(self.text[self.region_start :])
        deltas: list[ToolCallDelta] = []
        for index, item in enumerate(scanned):
            if item.name is None:
                break  # arguments are sent once the call has a name
            arguments = item.arguments
            if item.arguments_string:  # decoded only when whole: a partial escape has no meaning
                done = item.complete or final
                arguments = _decode_string(arguments) if done else ""
            if index == len(self.calls):
                self.calls.append(ToolCall(new_call_id(), item.name, ""))
                deltas.append(ToolCallDelta(index, self.calls[index].id, item.name))
            call = self.calls[index]
            if arguments.startswith(call.arguments) and len(arguments) > len(call.arguments):
                piece = arguments[len(call.arguments) :]
                call.arguments = arguments
                if deltas and deltas[-1].index == index:
                    deltas[-1].arguments += piece
                else:
                    deltas.append(ToolCallDelta(index, arguments=piece))
        return deltas


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (a marker that may be arriving)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _decode_string(raw: str) -> str:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip('"')
    return value if isinstance(value, str) else raw


# --- forcing a call -------------------------------------------------------------------------------------------------


def call_schema(tools: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call object to any of `tools` (OpenAI tool definitions)."""
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no room to ramble in blanks


def forced_call_grammar(
    format: ToolFormat, tools: list[dict[str, Any]], parallel: bool, special_ids: dict[str, int]
) -> str:
    """A Lark grammar (llguidance's dialect) that admits only tool calls to `tools` in `format`, whose arguments
    satisfy each function's parameters schema. `special_ids` maps a marker that is a special token to its id."""
    spec = FORMATS[format]
    schema = json.dumps(call_schema(tools, spec.arguments_key))
    marker = f"<[{special_ids[spec.marker]}]>" if spec.marker in special_ids else json.dumps(spec.marker)
    if format == "hermes":
        newline = json.dumps("\n")
        more = f" ({newline} call)*" if parallel else ""
        return f"start: call{more}\ncall: {marker} {newline} %json{schema} {json.dumps(chr(10) + '</tool_call>')}\n"
    if format == "mistral":
        items = {key: value for key, value in json.loads(schema).items() if key != "x-guidance"}
        array = {"type": "array", "items": items, "minItems": 1, "x-guidance": {"whitespace_flexible": False}}
        if not parallel:
            array["maxItems"] = 1
        return f"start: {marker} %json{json.dumps(array)}\n"
    return f"start: %json{schema}\n"

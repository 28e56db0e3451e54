"""A chat reply as the APIs beside chat completions show it: thinking, text and tool calls, whole (`split_thought`,
`split_reply`) or streamed as one API's events (`ReplyEvents`, run by `reply_stream`). Only the event shapes differ
between the APIs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import AsyncIterator
from typing import Literal

from app.errors import APIError
from app.generation import Choice, Generation, GenerationStream
from app.reasoning import CLOSE, OPEN, ReasoningSplitter
from app.tool_calls import ToolCall, ToolCallDelta, ToolCallParser, ToolFormat

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Part = Literal["thinking", "text", "call"]


def split_thought(text: str, thinking: bool | None) -> tuple[str, str]:
    """A whole reply's thinking and the rest (the answer), as chat completions split them; `thinking` is the run's
    (None: the model's replies are not split, and all of it is the answer)."""
    if thinking is None:
        return "", text
    return ReasoningSplitter(thinking).split_all(text)


def thinking_tokens(choice: Choice, thinking: bool | None) -> int:
    """How many of a choice's generated tokens are its thinking, `</think>` included: those that start before the
    marker ends (all of them where the thinking never closed; none where the reply did not think)."""
    if thinking is None:
        return 0
    text = choice.detok.text
    if not thinking and not text.lstrip().startswith(OPEN):
        return 0
    end = text.find(CLOSE)
    if end < 0:
        return choice.num_tokens
    return min(bisect_left(choice.detok.token_offsets, end + len(CLOSE)), choice.num_tokens)


def split_reply(text: str, tool_format: ToolFormat | None) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's text to show (None: nothing; with tools offered, text that is only whitespace is nothing) and
    its tool calls, as a streamed reply would have given them."""
    if tool_format is None:
        return text or None, []
    content, calls = ToolCallParser(tool_format).parse_all(text)
    return content if content.strip() else None, calls


class ReplyEvents(ABC):
    """Feed it a reply's text as it comes; it answers the SSE events to send. One part (thinking, text, or a tool
    call) is open at a time: a part opens when it has something to show and closes when the next one opens or the
    reply ends. Subclasses give the events of the stream's start and end, and of each part.

    `thinking` is the run's (None: the reply is not split); the thinking is split off as chat completions split it,
    and becomes a part of its own where `show_thinking`, else it is left out. Tool calls are read from the answer."""

    def __init__(
        self, tool_format: ToolFormat | None, thinking: bool | None = None, show_thinking: bool = True
    ) -> None:
        self.parser = ToolCallParser(tool_format) if tool_format else None
        self.thinking = thinking
        self.splitter = ReasoningSplitter(thinking) if thinking is not None else None
        self.show_thinking = show_thinking
        self.open: Part | None = None
        self.opened = 0  # parts opened so far
        self.held = ""  # with tools offered, text that is only whitespace so far opens no part (as in the reply)

    @abstractmethod
    def start(self) -> str: ...

    @abstractmethod
    def keepalive(self) -> str: ...

    @abstractmethod
    def finish(self, gen: Generation) -> str:
        """The events after the last part: call `close` first."""

    @abstractmethod
    def fail(self, error: APIError) -> str:
        """The event that ends a stream which failed after it started."""

    @abstractmethod
    def open_thinking(self) -> str: ...

    @abstractmethod
    def thinking_delta(self, text: str) -> str: ...

    @abstractmethod
    def close_thinking(self) -> str:
        """The events that end the thinking part."""

    @abstractmethod
    def open_text(self) -> str: ...

    @abstractmethod
    def text_delta(self, text: str) -> str: ...

    @abstractmethod
    def open_call(self, delta: ToolCallDelta) -> str:
        """A new call (its delta has the id and the name)."""

    @abstractmethod
    def call_delta(self, delta: ToolCallDelta) -> str:
        """More of a call's arguments."""

    @abstractmethod
    def close_part(self) -> str: ...

    def feed(self, text: str, final: bool) -> str:
        """The events for this piece of the reply; `final`: it is the last piece."""
        out = ""
        if self.splitter is not None:
            thought, text = self.splitter.feed(text)
            if final:
                more_thought, more_text = self.splitter.finish()
                thought, text = thought + more_thought, text + more_text
            out = self._thought(thought)
        if self.parser is None:
            return out + self._text(text)
        content, calls = self.parser.feed(text)
        if final:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        return out + self._text(content) + "".join(self._call(delta) for delta in calls)

    def close(self) -> str:
        kind, self.open = self.open, None
        if kind is None:
            return ""
        return self.close_thinking() if kind == "thinking" else self.close_part()

    def _thought(self, text: str) -> str:
        if not text or not self.show_thinking:
            return ""
        if self.open == "thinking":
            return self.thinking_delta(text)
        return self._begin("thinking") + self.open_thinking() + self.thinking_delta(text)

    def _text(self, text: str) -> str:
        if not text:
            return ""
        if self.open == "text":
            return self.text_delta(text)
        if self.parser is not None:
            self.held += text
            if not self.held.strip():
                return ""
            text, self.held = self.held, ""
        return self._begin("text") + self.open_text() + self.text_delta(text)

    def _call(self, delta: ToolCallDelta) -> str:
        out = self._begin("call") + self.open_call(delta) if delta.id is not None else ""
        return out + (self.call_delta(delta) if delta.arguments else "")

    def _begin(self, kind: Part) -> str:
        """Closes the open part (its events are returned) and counts the new one, before it opens."""
        closed = self.close()
        self.open = kind
        self.opened += 1
        return closed


def reply_stream(gen: Generation, events: ReplyEvents) -> GenerationStream:
    """The SSE response that runs `gen` through `events`; a failure after the start ends it with `events.fail`."""

    async def stream() -> AsyncIterator[str]:
        try:
            yield events.start()
            async for delta in gen.events():
                if delta is None:
                    yield events.keepalive()
                elif delta.text or delta.choice.finish_reason:
                    out = events.feed(delta.text, final=delta.choice.finish_reason is not None)
                    if out:
                        yield out
            yield events.finish(gen)
        except APIError as exc:
            yield events.fail(exc)
        finally:
            gen.close()

    return GenerationStream(gen, stream(), _HEADERS)

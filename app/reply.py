"""A chat reply as the APIs beside chat completions show it: text and tool calls, whole (`split_reply`) or streamed
as one API's events (`ReplyEvents`, run by `reply_stream`). Only the event shapes differ between the APIs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Literal

from app.errors import APIError
from app.generation import Generation, GenerationStream
from app.tool_calls import ToolCall, ToolCallDelta, ToolCallParser, ToolFormat

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def split_reply(text: str, tool_format: ToolFormat | None) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's text to show (None: nothing; with tools offered, text that is only whitespace is nothing) and
    its tool calls, as a streamed reply would have given them."""
    if tool_format is None:
        return text or None, []
    content, calls = ToolCallParser(tool_format).parse_all(text)
    return content if content.strip() else None, calls


class ReplyEvents(ABC):
    """Feed it a reply's text as it comes; it answers the SSE events to send. One part (text, or a tool call) is open
    at a time: a part opens when it has something to show and closes when the next one opens or the reply ends.
    Subclasses give the events of the stream's start and end, and of each part."""

    def __init__(self, tool_format: ToolFormat | None) -> None:
        self.parser = ToolCallParser(tool_format) if tool_format else None
        self.open: Literal["text", "call"] | None = None
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
        if self.parser is None:
            return self._text(text)
        content, calls = self.parser.feed(text)
        if final:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        return self._text(content) + "".join(self._call(delta) for delta in calls)

    def close(self) -> str:
        if self.open is None:
            return ""
        self.open = None
        return self.close_part()

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

    def _begin(self, kind: Literal["text", "call"]) -> str:
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

"""`MessageEvents`: a generation's text deltas as Anthropic's stream events. Text goes into a text block; with tools
offered, the tool-call parser's calls become tool_use blocks whose arguments stream as input_json_delta."""

from __future__ import annotations

from app.anthropic.responses import (
    BlockDelta,
    BlockStart,
    BlockStop,
    InputJsonDelta,
    MessageDelta,
    MessageResponse,
    MessageStart,
    MessageStop,
    MessageUsage,
    OutputUsage,
    Ping,
    StopDelta,
    StopReason,
    TextContent,
    TextDelta,
    ToolUseContent,
    tool_use_id,
)
from app.protocol_responses import TextEvents
from app.tool_calls import ToolCallDelta, ToolCallParser, ToolFormat


class MessageEvents:
    """Feed it the reply's text as it comes; it answers the SSE events to send. Blocks open when they have
    something to show and close when the next one opens or the message ends, so the events come in the order
    Anthropic documents: message_start, (content_block_start, content_block_delta*, content_block_stop)*,
    message_delta, message_stop."""

    def __init__(self, message_id: str, model: str, input_tokens: int, tool_format: ToolFormat | None) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.parser = ToolCallParser(tool_format) if tool_format else None
        self.block = -1  # index of the last block opened
        self.open = False
        self.in_text = False  # the open block is a text block
        self.held = ""  # with tools offered, text that is only whitespace so far opens no block (as in the reply)
        self.call_blocks: dict[int, int] = {}  # the parser's call index -> its block's index
        self.text_events = TextEvents(lambda index, text: BlockDelta(index=index, delta=TextDelta(text=text)))

    def start(self) -> str:
        usage = MessageUsage(input_tokens=self.input_tokens, output_tokens=0)
        message = MessageResponse(id=self.message_id, model=self.model, content=[], usage=usage)
        return MessageStart(message=message).to_sse() + Ping().to_sse()

    def ping(self) -> str:
        """A keep-alive while nothing else is sent."""
        return Ping().to_sse()

    def feed(self, text: str, final: bool) -> str:
        """The events for this piece of the reply; `final`: it is the last piece."""
        if self.parser is None:
            return self._text(text)
        content, calls = self.parser.feed(text)
        if final:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        return self._text(content) + "".join(self._call(delta) for delta in calls)

    def finish(self, reason: StopReason, stop_sequence: str | None, output_tokens: int) -> str:
        delta = MessageDelta(
            delta=StopDelta(stop_reason=reason, stop_sequence=stop_sequence),
            usage=OutputUsage(output_tokens=output_tokens),
        )
        return self._close() + delta.to_sse() + MessageStop().to_sse()

    def _text(self, text: str) -> str:
        if not text:
            return ""
        if self.in_text:
            return self.text_events.event(self.block, text)
        if self.parser is not None:
            self.held += text
            if not self.held.strip():
                return ""
            text, self.held = self.held, ""
        opened = self._open(TextContent(text=""))
        self.in_text = True
        return opened + self.text_events.event(self.block, text)

    def _call(self, delta: ToolCallDelta) -> str:
        out = ""
        if delta.id is not None:  # a new call: its own block
            out = self._open(ToolUseContent(id=tool_use_id(delta.id), name=delta.name or ""))
            self.call_blocks[delta.index] = self.block
        if delta.arguments:
            index = self.call_blocks[delta.index]
            out += BlockDelta(index=index, delta=InputJsonDelta(partial_json=delta.arguments)).to_sse()
        return out

    def _open(self, block: TextContent | ToolUseContent) -> str:
        closed = self._close()
        self.block += 1
        self.open, self.in_text = True, False
        return closed + BlockStart(index=self.block, content_block=block).to_sse()

    def _close(self) -> str:
        if not self.open:
            return ""
        self.open = self.in_text = False
        return BlockStop(index=self.block).to_sse()

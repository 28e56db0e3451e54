"""`MessageEvents`: a generation's text deltas as Anthropic's stream events. Thinking (where the model's replies are
split and thinking is on) goes into a thinking block first, as thinking_delta events and a signature_delta before its
content_block_stop; text goes into a text block; with tools offered, the tool-call parser's calls become tool_use
blocks whose arguments stream as input_json_delta."""

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
    SignatureDelta,
    StopDelta,
    TextContent,
    TextDelta,
    ThinkingContent,
    ThinkingDelta,
    ToolUseContent,
    stop_reason,
    thinking_signature,
    tool_use_id,
)
from app.errors import APIError
from app.generation import Generation
from app.protocol_responses import TextEvents
from app.reply import ReplyEvents
from app.tool_calls import ToolCallDelta, ToolFormat


class MessageEvents(ReplyEvents):
    """The events in the order Anthropic documents: message_start, (content_block_start, content_block_delta*,
    content_block_stop)*, message_delta, message_stop; each part of the reply is a block."""

    def __init__(
        self,
        message_id: str,
        model: str,
        input_tokens: int,
        tool_format: ToolFormat | None,
        thinking: bool | None = None,
        show_thinking: bool = False,
        omit_thinking: bool = False,
    ) -> None:
        super().__init__(tool_format, thinking, show_thinking)
        self.omit_thinking = omit_thinking  # display 'omitted': the block has its signature, not its text
        self.thought: list[str] = []  # the thinking so far, signed when its block closes
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.call_blocks: dict[int, int] = {}  # the parser's call index -> its block's index
        self.text_events = TextEvents(lambda index, text: BlockDelta(index=index, delta=TextDelta(text=text)))

    @property
    def block(self) -> int:
        """The index of the last block opened."""
        return self.opened - 1

    def start(self) -> str:
        usage = MessageUsage(input_tokens=self.input_tokens, output_tokens=0)
        message = MessageResponse(id=self.message_id, model=self.model, content=[], usage=usage)
        return MessageStart(message=message).to_sse() + Ping().to_sse()

    def keepalive(self) -> str:
        return Ping().to_sse()

    def finish(self, gen: Generation) -> str:
        reason, sequence = stop_reason(gen.choices[0], bool(self.parser and self.parser.calls))
        delta = MessageDelta(
            delta=StopDelta(stop_reason=reason, stop_sequence=sequence),
            usage=OutputUsage(output_tokens=gen.num_completion_tokens),
        )
        return self.close() + delta.to_sse() + MessageStop().to_sse()

    def fail(self, error: APIError) -> str:
        return error.to_anthropic().to_sse()

    def open_thinking(self) -> str:
        return BlockStart(index=self.block, content_block=ThinkingContent(thinking="", signature="")).to_sse()

    def thinking_delta(self, text: str) -> str:
        self.thought.append(text)
        if self.omit_thinking:
            return ""
        return BlockDelta(index=self.block, delta=ThinkingDelta(thinking=text)).to_sse()

    def close_thinking(self) -> str:
        signature = SignatureDelta(signature=thinking_signature("".join(self.thought)))
        return BlockDelta(index=self.block, delta=signature).to_sse() + BlockStop(index=self.block).to_sse()

    def open_text(self) -> str:
        return BlockStart(index=self.block, content_block=TextContent(text="")).to_sse()

    def text_delta(self, text: str) -> str:
        return self.text_events.event(self.block, text)

    def open_call(self, delta: ToolCallDelta) -> str:
        assert delta.id is not None
        self.call_blocks[delta.index] = self.block
        block = ToolUseContent(id=tool_use_id(delta.id), name=delta.name or "")
        return BlockStart(index=self.block, content_block=block).to_sse()

    def call_delta(self, delta: ToolCallDelta) -> str:
        index = self.call_blocks[delta.index]
        return BlockDelta(index=index, delta=InputJsonDelta(partial_json=delta.arguments)).to_sse()

    def close_part(self) -> str:
        return BlockStop(index=self.block).to_sse()

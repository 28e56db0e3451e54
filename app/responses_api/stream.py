"""`ResponseEvents`: a generation's text deltas as the Responses API's stream events. A thinking model's thinking goes
into a reasoning item first, with one reasoning_text part; text goes into a message item with one output_text part;
with tools offered, the tool-call parser's calls become function_call items whose arguments stream as
function_call_arguments deltas."""

from __future__ import annotations

from app.errors import APIError
from app.generation import Generation
from app.reply import ReplyEvents, thinking_tokens
from app.responses_api.responses import (
    ArgumentsDelta,
    ArgumentsDone,
    FunctionCall,
    ItemEvent,
    OutputItem,
    OutputMessage,
    OutputText,
    PartEvent,
    ReasoningDelta,
    ReasoningDone,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseError,
    ResponseEvent,
    TextDelta,
    TextDone,
    new_id,
)
from app.serving import SSE_KEEPALIVE
from app.tool_calls import ToolCallDelta, ToolFormat


class ResponseEvents(ReplyEvents):
    """The events in the order OpenAI documents: response.created, response.in_progress; per output item
    output_item.added, then content_part.added, reasoning_text.delta*, reasoning_text.done, content_part.done (a
    reasoning item), content_part.added, output_text.delta*, output_text.done, content_part.done (a message) or
    function_call_arguments.delta*, .done (a function call), then output_item.done; last response.completed or
    response.incomplete, or response.failed if the generation fails. Each event carries its sequence number."""

    def __init__(
        self,
        response: Response,
        tool_format: ToolFormat | None,
        thinking: bool | None = None,
        show_thinking: bool = True,
    ) -> None:
        super().__init__(tool_format, thinking, show_thinking)
        self.response = response  # in_progress and without output: what the stream starts with
        self.items: list[OutputItem] = []
        self.calls: dict[int, int] = {}  # the parser's call index -> its item's output index
        self.sequence = -1
        self.pieces: list[str] = []  # the open message's text so far, joined when it closes (not copied per delta)

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def _lifecycle(self, kind: str, response: Response) -> str:
        return ResponseEvent(type=f"response.{kind}", sequence_number=self._next(), response=response).to_sse()

    def _item(self, kind: str, index: int) -> str:
        item = self.items[index].model_copy(deep=True)  # as it is now: the list goes on changing
        return ItemEvent(
            type=f"response.output_item.{kind}", sequence_number=self._next(), output_index=index, item=item
        ).to_sse()

    def _part(self, kind: str, index: int, message: OutputMessage | ReasoningItem) -> str:
        return PartEvent(
            type=f"response.content_part.{kind}",
            sequence_number=self._next(),
            item_id=message.id,
            output_index=index,
            content_index=0,
            part=message.content[0].model_copy(),
        ).to_sse()

    def start(self) -> str:
        return self._lifecycle("created", self.response) + self._lifecycle("in_progress", self.response)

    def keepalive(self) -> str:
        return SSE_KEEPALIVE

    def finish(self, gen: Generation) -> str:
        out = "" if self.opened else self._begin("text") + self.open_text()  # an empty reply is an empty message
        reasoning = thinking_tokens(gen.choices[0], self.thinking)
        done = self.response.finished(self.items, gen, reasoning)  # marks the open item incomplete at max_output_tokens
        return out + self.close() + self._lifecycle(done.status, done)

    def fail(self, error: APIError) -> str:
        if self.open in ("text", "thinking"):
            self._message_text()
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        update = {"status": "failed", "output": self.items, "error": ResponseError(code=code, message=error.message)}
        return self._lifecycle("failed", self.response.model_copy(update=update))

    def open_thinking(self) -> str:
        index = len(self.items)
        item = ReasoningItem(id=new_id("rs"), status="in_progress", content=[])
        self.items.append(item)
        added = self._item("added", index)
        item.content.append(ReasoningText(text=""))
        self.pieces = []
        return added + self._part("added", index, item)

    def thinking_delta(self, text: str) -> str:
        index = len(self.items) - 1
        self.pieces.append(text)
        return ReasoningDelta(
            sequence_number=self._next(), item_id=self.items[index].id, output_index=index, content_index=0, delta=text
        ).to_sse()

    def close_thinking(self) -> str:
        index = len(self.items) - 1
        item = self.items[index]
        assert isinstance(item, ReasoningItem)
        if item.status == "in_progress":
            item.status = "completed"
        text = self._message_text()
        done = ReasoningDone(
            sequence_number=self._next(), item_id=item.id, output_index=index, content_index=0, text=text
        )
        return done.to_sse() + self._part("done", index, item) + self._item("done", index)

    def open_text(self) -> str:
        index = len(self.items)
        message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        self.items.append(message)
        added = self._item("added", index)
        message.content.append(OutputText(text=""))
        self.pieces = []
        return added + self._part("added", index, message)

    def text_delta(self, text: str) -> str:
        index = len(self.items) - 1
        message = self.items[index]
        assert isinstance(message, OutputMessage)
        self.pieces.append(text)
        return TextDelta(
            sequence_number=self._next(), item_id=message.id, output_index=index, content_index=0, delta=text
        ).to_sse()

    def open_call(self, delta: ToolCallDelta) -> str:
        assert delta.id is not None
        self.calls[delta.index] = index = len(self.items)
        self.items.append(
            FunctionCall(id=new_id("fc"), call_id=delta.id, name=delta.name or "", arguments="", status="in_progress")
        )
        return self._item("added", index)

    def call_delta(self, delta: ToolCallDelta) -> str:
        index = self.calls[delta.index]
        call = self.items[index]
        assert isinstance(call, FunctionCall)
        call.arguments += delta.arguments
        return ArgumentsDelta(
            sequence_number=self._next(), item_id=call.id, output_index=index, delta=delta.arguments
        ).to_sse()

    def close_part(self) -> str:
        index = len(self.items) - 1
        item = self.items[index]
        if item.status == "in_progress":
            item.status = "completed"
        if isinstance(item, FunctionCall):
            done = ArgumentsDone(
                sequence_number=self._next(),
                item_id=item.id,
                output_index=index,
                name=item.name,
                arguments=item.arguments,
            )
            return done.to_sse() + self._item("done", index)
        text = self._message_text()
        done_text = TextDone(
            sequence_number=self._next(), item_id=item.id, output_index=index, content_index=0, text=text
        )
        return done_text.to_sse() + self._part("done", index, item) + self._item("done", index)

    def _message_text(self) -> str:
        """The open message's (or reasoning item's) text, put into its item."""
        message = self.items[-1]
        assert isinstance(message, OutputMessage | ReasoningItem)
        message.content[0].text = "".join(self.pieces)
        return message.content[0].text

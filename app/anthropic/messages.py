"""POST /v1/messages and /v1/messages/count_tokens on the chat pipeline: `Serving.start_chat` admits, templates,
forces tool calls and builds the generation exactly as for chat completions; this module only reshapes what comes
out (one message, or its stream of events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.anthropic.protocol import CountTokensRequest, MessagesRequest, tool_input
from app.anthropic.responses import (
    CountTokensResponse,
    MessageResponse,
    MessageUsage,
    StopReason,
    TextContent,
    ToolUseContent,
    new_message_id,
    tool_use_id,
)
from app.anthropic.stream import MessageEvents
from app.errors import APIError
from app.generation import Choice, GenerationStream
from app.serving import Serving
from app.tool_calls import ToolCall, ToolCallParser

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def create_message(serving: Serving, body: MessagesRequest, request: Request) -> Response:
    messages, tools = body.template_messages(), body.offered_tools()
    run = await serving.start_chat(body, messages, tools, body.forced_tools(), body.parallel_tool_calls, None)
    served, gen, tool_format = run.served, run.generation, run.tool_format
    message_id = new_message_id()

    if body.stream:
        events = MessageEvents(message_id, served.name, gen.num_prompt_tokens, tool_format)

        async def stream() -> AsyncIterator[str]:
            try:
                yield events.start()
                async for delta in gen.events():
                    if delta is None:
                        yield events.ping()
                    elif delta.text or delta.choice.finish_reason:
                        out = events.feed(delta.text, final=delta.choice.finish_reason is not None)
                        if out:
                            yield out
                choice = gen.choices[0]
                reason, sequence = stop_reason(choice, bool(events.parser and events.parser.calls))
                yield events.finish(reason, sequence, gen.num_completion_tokens)
            except APIError as exc:
                yield exc.to_anthropic().to_sse()
            finally:
                gen.close()

        return GenerationStream(gen, stream(), _HEADERS)

    await serving.collect(gen, request)
    choice = gen.choices[0]
    text, calls = choice.detok.text, list[ToolCall]()
    if tool_format is not None:
        text, calls = ToolCallParser(tool_format).parse_all(text)
    content: list[TextContent | ToolUseContent] = []
    if text.strip() if tool_format is not None else text:
        content.append(TextContent(text=text))
    for call in calls:
        content.append(ToolUseContent(id=tool_use_id(call.id), name=call.name, input=tool_input(call.arguments)))
    reason, sequence = stop_reason(choice, bool(calls))
    usage = MessageUsage(input_tokens=gen.num_prompt_tokens, output_tokens=gen.num_completion_tokens)
    out = MessageResponse(
        id=message_id, model=served.name, content=content, stop_reason=reason, stop_sequence=sequence, usage=usage
    )
    return JSONResponse(out.to_dict())


async def count_tokens(serving: Serving, body: CountTokensRequest) -> Response:
    """The prompt's tokens as /v1/messages would send it to the model (no admission: nothing runs)."""
    served = await serving.model(body.model)
    prompt, _ = await serving.chat_prompt(served, body.template_messages(), body.offered_tools())
    return JSONResponse(CountTokensResponse(input_tokens=len(prompt)).to_dict())


def stop_reason(choice: Choice, called: bool) -> tuple[StopReason, str | None]:
    """Anthropic's stop reason, and the stop sequence that matched: a stop sequence, the max_tokens limit, a reply
    that made tool calls, or the model's own end."""
    if choice.detok.stopped:
        return "stop_sequence", choice.detok.stop_string
    if choice.finish_reason == "length":
        return "max_tokens", None
    return ("tool_use" if called else "end_turn"), None

"""POST /v1/messages and /v1/messages/count_tokens on the chat pipeline: `Serving.start_chat` admits, templates,
forces tool calls and builds the generation exactly as for chat completions; this module only reshapes what comes
out (one message, or its stream of events)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.anthropic.protocol import CountTokensRequest, MessagesRequest, tool_input
from app.anthropic.responses import (
    CountTokensResponse,
    MessageResponse,
    MessageUsage,
    TextContent,
    ToolUseContent,
    new_message_id,
    stop_reason,
    tool_use_id,
)
from app.anthropic.stream import MessageEvents
from app.reply import reply_stream, split_reply
from app.serving import Serving


async def create_message(serving: Serving, body: MessagesRequest, request: Request) -> Response:
    messages, tools = body.template_messages(), body.offered_tools()
    run = await serving.start_chat(body, messages, tools, body.forced_tools(), body.parallel_tool_calls, None)
    served, gen, tool_format = run.served, run.generation, run.tool_format
    message_id = new_message_id()
    if body.stream:
        return reply_stream(gen, MessageEvents(message_id, served.name, gen.num_prompt_tokens, tool_format))

    await serving.collect(gen, request)
    choice = gen.choices[0]
    text, calls = split_reply(choice.detok.text, tool_format)
    content: list[TextContent | ToolUseContent] = [TextContent(text=text)] if text is not None else []
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

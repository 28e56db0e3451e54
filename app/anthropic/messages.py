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
    ThinkingContent,
    ToolUseContent,
    new_message_id,
    stop_reason,
    thinking_signature,
    tool_use_id,
)
from app.anthropic.stream import MessageEvents
from app.errors import APIError
from app.reasoning import THINKING_CONSTRAINT
from app.reply import reply_stream, split_reply, split_thought
from app.serving import Serving


async def create_message(serving: Serving, body: MessagesRequest, request: Request) -> Response:
    """A thinking model's thinking (where its entry splits replies) comes first as a thinking block while thinking is
    on, and is left out while it is off; either way its tokens count in output_tokens."""
    messages, tools, kwargs = body.template_messages(), body.offered_tools(), body.template_kwargs()
    try:
        run = await serving.start_chat(
            body, messages, tools, body.forced_tools(), body.parallel_tool_calls, None, kwargs
        )
    except APIError as exc:
        if exc.code != THINKING_CONSTRAINT:
            raise
        message = (
            f"model '{body.model}' thinks before it answers, and a forced tool call would constrain the thinking too: "
            'use tool_choice auto or none while thinking is on, or send thinking {"type": "disabled"}'
        )
        raise APIError.invalid_request(message, param="tool_choice", code=exc.code) from exc
    served, gen, tool_format, thinking = run.served, run.generation, run.tool_format, run.thinking
    message_id = new_message_id()
    if body.stream:
        events = MessageEvents(
            message_id, served.name, gen.num_prompt_tokens, tool_format, thinking, body.thinks, body.omits_thinking
        )
        return reply_stream(gen, events)

    await serving.collect(gen, request)
    choice = gen.choices[0]
    thought, answer = split_thought(choice.detok.text, thinking)
    text, calls = split_reply(answer, tool_format)
    content: list[ThinkingContent | TextContent | ToolUseContent] = []
    if thought and body.thinks:
        shown = "" if body.omits_thinking else thought
        content.append(ThinkingContent(thinking=shown, signature=thinking_signature(thought)))
    if text is not None:
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
    messages, tools = body.template_messages(), body.offered_tools()
    prompt, _ = await serving.chat_prompt(served, messages, tools, body.template_kwargs())
    return JSONResponse(CountTokensResponse(input_tokens=len(prompt)).to_dict())

"""POST /v1/responses on the chat pipeline: `Serving.start_chat` admits, templates, forces tool calls, applies
text.format and builds the generation exactly as for chat completions; this module only reshapes what comes out
(one Response object, or its stream of events)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.errors import APIError
from app.reasoning import THINKING_CONSTRAINT
from app.reply import reply_stream, split_reply, split_thought, thinking_tokens
from app.responses_api.protocol import ResponsesRequest
from app.responses_api.responses import (
    FunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    new_id,
)
from app.responses_api.responses import Response as ResponseObject
from app.responses_api.stream import ResponseEvents
from app.serving import Serving


async def create_response(serving: Serving, body: ResponsesRequest, request: Request) -> Response:
    """A thinking model's thinking (where its entry splits replies) comes first as a reasoning item, unless
    reasoning.effort is 'none'; its tokens are the usage's reasoning_tokens either way."""
    structured, kwargs = body.structured_output(), body.template_kwargs()
    try:
        run = await serving.start_chat(
            body, body.template_messages(), body.offered_tools(), body.forced_tools(), body.parallel, structured, kwargs
        )
    except APIError as exc:
        if exc.code != THINKING_CONSTRAINT:
            raise
        message = (
            f"model '{body.model}' thinks before it answers, and a forced tool call would constrain the thinking too: "
            'send reasoning {"effort": "none"} to turn thinking off for it'
        )
        raise APIError.invalid_request(message, param=exc.param, code=exc.code) from exc
    gen, tool_format, thinking = run.generation, run.tool_format, run.thinking
    started = _in_progress(body, run.served.name)
    if body.stream:
        return reply_stream(gen, ResponseEvents(started, tool_format, thinking, body.shows_reasoning))

    await serving.collect(gen, request)
    choice = gen.choices[0]
    thought, answer = split_thought(choice.detok.text, thinking)
    text, calls = split_reply(answer, tool_format)
    output: list[OutputItem] = []
    if thought and body.shows_reasoning:
        output.append(ReasoningItem(id=new_id("rs"), status="completed", content=[ReasoningText(text=thought)]))
    if text is not None or not (calls or output):  # an empty reply is an empty message
        content = [OutputText(text=text or "")]
        output.append(OutputMessage(id=new_id("msg"), status="completed", content=content))
    for call in calls:
        item = FunctionCall(
            id=new_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments, status="completed"
        )
        output.append(item)
    return JSONResponse(started.finished(output, gen, thinking_tokens(choice, thinking)).to_dict())


def _in_progress(body: ResponsesRequest, model: str) -> ResponseObject:
    """The response before it has output, echoing the request's settings with OpenAI's defaults filled in."""
    text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {}
    choice = body.tool_choice
    return ResponseObject(
        id=new_id("resp"),
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=model,
        parallel_tool_calls=body.parallel_tool_calls,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        text={"format": {"type": "text"}, **text},
        tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools],
        user=body.user,
        metadata=body.metadata or {},
        reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
    )

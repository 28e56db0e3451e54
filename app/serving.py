"""Chat and text completions, and embeddings: template and tokenize, validate against the context, admit, run, and
answer as one JSON body or as SSE chunks built from the protocol models.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.embeddings import check_dimensions, input_token_ids, vector
from app.errors import APIError
from app.generation import Choice, Delta, Generation, GenerationStream, cancel_on_disconnect
from app.generic_tools import GENERIC_FORMAT, has_tool_turns, teaches_tools, with_tool_prompt
from app.grammar_check import GrammarCheck
from app.logprobs import chat_logprobs, completion_logprobs, echo_logprobs, joined, vllm_prompt_logprobs
from app.metrics import Metrics
from app.model_pool import ModelPool, ServedModel
from app.preparation import chat_prompt, completion_prompts, too_many_prompts
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.protocol_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
    PromptLogprobs,
    TextEvents,
    Usage,
    new_id,
)
from app.reasoning import ReasoningSplitter, answer_constraint, parses_reasoning, prompt_opens_thinking
from app.settings import Settings
from app.tokenizer import ChatTemplateError, Tokenizer
from app.tool_calls import ToolCallParser, ToolFormat, detect_format, forced_call_grammar
from worker.messages import SamplingParams, StructuredOutput

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"
ChunkBuilder = Callable[[Delta], str]


@dataclass
class ChatRun:
    """A chat-shaped request, admitted and ready to run: its model, generation, tool-call format if it offers tools,
    and whether its reply is split into reasoning and content (None: not; True: the prompt opened the thinking)."""

    served: ServedModel
    generation: Generation
    tool_format: ToolFormat | None
    thinking: bool | None = None


class Serving:
    def __init__(self, pool: ModelPool, metrics: Metrics, settings: Settings) -> None:
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.grammar_check = GrammarCheck()

    async def _admit(self, model_name: str, num_prompts: int, n: int, task: str = "generate") -> ServedModel:
        """The model, with room taken for the request's engine requests (prompts x n), all or none: 400 if it does
        not do `task`, or if they can never fit (more than its running slots plus waiting queue), 429 with
        Retry-After while it is too busy."""
        served = await self.model(model_name, task)
        client, info, count = served.client, served.info, num_prompts * n
        if count > client.capacity:
            limit = (
                f"model '{served.name}' takes at most {client.capacity} at once (max_num_seqs {info.max_num_seqs} + "
                f"max_waiting_requests {client.max_waiting_requests})"
            )
            if task == "embed":
                message = f"this request has {count} inputs; {limit}; send fewer inputs"
                raise APIError.invalid_request(message, param="input", code="too_many_inputs")
            raise APIError.invalid_request(
                f"this request asks for {count} completions ({num_prompts} prompt(s) x n={n}); {limit}; send fewer "
                "prompts or a lower n",
                param="n" if n > 1 else "prompt",
                code="too_many_completions",
            )
        if not client.admit(count):
            self.metrics.rejected.labels(served.name, "queue_full").inc()
            raise APIError.rate_limited(
                f"model '{served.name}' is busy: {client.num_in_flight()} of its {client.capacity} request slots are "
                f"taken and this request needs {count}; retry shortly",
                retry_after=1,
            )
        return served

    async def model(self, model_name: str, task: str = "generate") -> ServedModel:
        """The model, ready to serve; 400 if it does not do `task` (an embedding model asked to chat)."""
        served = await self.pool.acquire(model_name)
        if served.entry.task != task:
            serves = (
                "/v1/embeddings"
                if served.entry.task == "embed"
                else "/v1/chat/completions, /v1/completions, /v1/responses and /v1/messages"
            )
            message = f"model '{served.name}' is {_TASKS[served.entry.task]}: it answers {serves} only"
            raise APIError.invalid_request(message, param="model", code="model_not_supported")
        return served

    def _params(self, served: ServedModel, prompts: list[list[int]], body: Any) -> SamplingParams:
        limit = served.info.max_model_len
        longest = max(len(p) for p in prompts)
        params: SamplingParams = body.to_sampling_params(max(1, limit - longest))
        if longest + params.max_tokens > limit:
            param = "prompt" if isinstance(body, CompletionRequest) else getattr(body, "CONVERSATION", "messages")
            raise APIError.context_length_exceeded(limit, longest, params.max_tokens, param=param)
        return params

    def _generation(
        self, served: ServedModel, prompts: list[list[int]], body: Any, structured: StructuredOutput | None = None
    ) -> Generation:
        params = self._params(served, prompts, body)
        if structured is not None:
            params = msgspec.structs.replace(params, structured=structured)
        timeout = min(filter(None, (body.timeout, self.settings.request_timeout)), default=None)
        return Generation(
            served, prompts, params, body.n, body.stop_strings, self.metrics, timeout, self.settings.keepalive_seconds
        )

    # --- chat ----------------------------------------------------------------------------------------------------

    async def start_chat(
        self,
        body: Any,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        forced: list[dict[str, Any]] | None,
        parallel: bool,
        structured: StructuredOutput | None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> ChatRun:
        """What every chat-shaped API (chat completions, Anthropic's messages) does before it runs: admit, template
        and tokenize with the offered `tools` (OpenAI tool definitions), force a call to one of `forced` (one or more
        calls if `parallel`) or apply `structured`, check the grammar, and build the generation. `body` gives model, n,
        stop_strings, timeout and to_sampling_params; `template_kwargs` go to the chat template."""
        served = await self._admit(body.model, 1, body.n)
        prompt, tool_format = await self.chat_prompt(served, messages, tools, template_kwargs)
        assert served.tokenizer is not None
        thinking = _thinking(served, served.tokenizer, prompt)
        grammar = _forced_call(tool_format, served.tokenizer, forced, parallel) if forced else None
        constraint = grammar or structured
        if thinking:
            constraint = answer_constraint(served.name, constraint)
        await self.grammar_check(served, constraint)
        return ChatRun(served, self._generation(served, [prompt], body, constraint), tool_format, thinking)

    async def chat_prompt(
        self,
        served: ServedModel,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[int], ToolFormat | None]:
        """The conversation's prompt through the model's chat template, and the model's tool-call format when tools
        are offered (400 if it has none, or if the template refuses the conversation). A template that teaches no
        tools gets them, and the conversation's calls and results, in the generic Hermes prompt."""
        tokenizer = served.tokenizer
        assert tokenizer is not None
        if _generic_tools(served, tokenizer) and (tools or has_tool_turns(messages)):
            messages = with_tool_prompt(messages, tools)
            tool_format, extra = (GENERIC_FORMAT if tools else None), {}
        else:
            tool_format = _tool_format(served, tokenizer) if tools else None
            extra = {"tools": tools} if tools else {}
        try:
            return await chat_prompt(tokenizer, messages, **(template_kwargs or {}), **extra), tool_format
        except ChatTemplateError as exc:
            raise APIError.invalid_request(str(exc), param="messages") from exc

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.to_template() for m in body.messages]
        forced = body.forced_tools() if body.forces_tool_call else None
        parallel = body.parallel_tool_calls and not body.names_a_tool
        structured, template_kwargs = body.structured_output(), body.chat_template_kwargs
        run = await self.start_chat(body, messages, body.offered_tools(), forced, parallel, structured, template_kwargs)
        served, gen, tool_format, thinking = run.served, run.generation, run.tool_format, run.thinking
        response_id = new_id("chatcmpl")
        want_logprobs = body.logprobs
        parsers = {c.index: ToolCallParser(tool_format) for c in gen.choices} if tool_format else {}
        splitters = {c.index: ReasoningSplitter(thinking) for c in gen.choices} if thinking is not None else {}
        named = body.names_a_tool  # OpenAI finishes a call to a named function with 'stop'
        timed = body.return_metrics or self.settings.request_metrics

        if body.stream:

            def first(index: int) -> str:
                choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
                return ChatCompletionChunk(id=response_id, model=served.name, choices=[choice]).to_sse()

            plain = TextEvents(
                lambda index, text: ChatCompletionChunk(
                    id=response_id,
                    model=served.name,
                    choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))],
                )
            )

            def chunk(delta: Delta) -> str:
                reason = delta.choice.finish_reason
                if not (want_logprobs or parsers or splitters or reason):
                    return plain.event(delta.choice.index, delta.text)
                logprobs = chat_logprobs(delta.choice.detok, delta.logprobs) if want_logprobs else None
                thought, content, calls = "", delta.text, None
                splitter = splitters.get(delta.choice.index)
                if splitter is not None:
                    thought, content = _joined(splitter.feed(delta.text), splitter.finish() if reason else ("", ""))
                parser = parsers.get(delta.choice.index)
                if parser is not None:
                    content, tool_deltas = parser.feed(content)
                    if reason:
                        rest, more = parser.finish()
                        content, tool_deltas = content + rest, tool_deltas + more
                    calls = [d.to_dict() for d in tool_deltas] or None
                if (parser or splitter) and not (thought or content or calls or reason or logprobs):
                    return ""  # all held back: a marker may be starting
                choice = ChatChunkChoice(
                    index=delta.choice.index,
                    delta=ChatDelta(
                        content=content or None if calls or thought else content,
                        tool_calls=calls,
                        reasoning_content=thought or None,
                        reasoning=thought or None,
                    )
                    if content or calls or thought or not reason
                    else ChatDelta(),
                    logprobs=logprobs,
                    finish_reason=_finish(reason, bool(parser and parser.calls) and not named),
                )
                return ChatCompletionChunk(id=response_id, model=served.name, choices=[choice]).to_sse()

            def usage() -> str:
                metrics = gen.request_metrics() if timed else None
                out = ChatCompletionChunk(
                    id=response_id, model=served.name, choices=[], usage=_usage(gen), metrics=metrics
                )
                return out.to_sse()

            prelude = [first(c.index) for c in gen.choices]
            return self._stream(gen, prelude, chunk, usage if body.include_usage or timed else None)

        await self.collect(gen, request)
        choices = []
        for c in gen.choices:
            whole = ReasoningSplitter(thinking) if thinking is not None else None
            thought, text = whole.split_all(c.detok.text) if whole else ("", c.detok.text)
            content, tool_calls = text, None
            if tool_format is not None:
                content, calls = ToolCallParser(tool_format).parse_all(text)
                tool_calls = [_tool_call(call.id, call.name, call.arguments) for call in calls] or None
            message = ChatResponseMessage(
                content=content or None if tool_calls or thought else content,
                tool_calls=tool_calls,
                reasoning_content=thought or None,
                reasoning=thought or None,
            )
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=chat_logprobs(c.detok, c.logprobs[: c.num_tokens]) if want_logprobs else None,
                    finish_reason=_finish(c.finish_reason, bool(message.tool_calls) and not named) or "stop",
                )
            )
        out = ChatCompletionResponse(
            id=response_id,
            model=served.name,
            choices=choices,
            usage=_usage(gen),
            prompt_logprobs=_prompt_logprobs(gen.choices[0], body.prompt_logprobs),
            metrics=gen.request_metrics() if timed else None,
        )
        return JSONResponse(out.to_dict())

    # --- completions ---------------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompt, cap = body.prompt, self.settings.max_prompts_per_request
        num_prompts = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
        if num_prompts > cap:
            raise too_many_prompts(cap, num_prompts)
        served = await self._admit(body.model, num_prompts, body.n)
        tokenizer = served.tokenizer
        assert tokenizer is not None
        prompts = await completion_prompts(tokenizer, body.prompts(), served.info.vocab_size)
        await self.grammar_check(served, body.structured_output())
        gen = self._generation(served, prompts, body)
        response_id = new_id("cmpl")
        echo = [tokenizer.decode(p, skip_special_tokens=False) if body.echo else "" for p in prompts]
        want_logprobs = body.logprobs is not None
        timed = body.return_metrics or self.settings.request_metrics

        def prompt_part(choice: Choice) -> CompletionLogprobs:
            """An echoed prompt's logprobs (OpenAI's legacy echo with logprobs), before the generated tokens'."""
            prompt, scores = prompts[choice.prompt_index], choice.prompt_logprobs or []
            return echo_logprobs(tokenizer, choice.detok, prompt, scores, body.logprobs or 0, echo[choice.prompt_index])

        if body.stream:
            sent = dict.fromkeys((c.index for c in gen.choices), 0)  # tokens whose logprobs went out, per choice
            # an echo with logprobs goes in a choice's first chunk, with its tokens' logprobs, not ahead of them
            unechoed = {c.index for c in gen.choices} if body.echo_logprobs is not None else set()
            plain = TextEvents(
                lambda index, text: CompletionResponse(
                    id=response_id, model=served.name, choices=[CompletionChoice(index=index, text=text)]
                )
            )

            def chunk(delta: Delta) -> str:
                choice = delta.choice
                if not (want_logprobs or choice.finish_reason):
                    return plain.event(choice.index, delta.text)
                logprobs, text = None, delta.text
                if want_logprobs:
                    echo_chars = len(echo[choice.prompt_index])
                    logprobs = completion_logprobs(choice.detok, delta.logprobs, sent[choice.index], echo_chars)
                    sent[choice.index] += len(delta.logprobs)
                if logprobs is not None and choice.index in unechoed:
                    unechoed.discard(choice.index)
                    text, logprobs = echo[choice.prompt_index] + text, joined(prompt_part(choice), logprobs)
                out = CompletionChoice(
                    index=choice.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=_finish(choice.finish_reason),
                )
                return CompletionResponse(id=response_id, model=served.name, choices=[out]).to_sse()

            def usage() -> str:
                metrics = gen.request_metrics() if timed else None
                out = CompletionResponse(
                    id=response_id, model=served.name, choices=[], usage=_usage(gen), metrics=metrics
                )
                return out.to_sse()

            prelude = [
                CompletionResponse(
                    id=response_id,
                    model=served.name,
                    choices=[CompletionChoice(index=c.index, text=echo[c.prompt_index])],
                ).to_sse()
                for c in gen.choices
                if echo[c.prompt_index] and c.index not in unechoed
            ]
            return self._stream(gen, prelude, chunk, usage if body.include_usage or timed else None)

        await self.collect(gen, request)
        choices = []
        for c in gen.choices:
            logprobs = None
            if want_logprobs:
                logprobs = completion_logprobs(c.detok, c.logprobs[: c.num_tokens], 0, len(echo[c.prompt_index]))
                if body.echo_logprobs is not None:
                    logprobs = joined(prompt_part(c), logprobs)
            choices.append(
                CompletionChoice(
                    index=c.index,
                    text=echo[c.prompt_index] + c.detok.text,
                    logprobs=logprobs,
                    finish_reason=_finish(c.finish_reason) or "stop",
                    prompt_logprobs=_prompt_logprobs(c, body.prompt_logprobs),
                )
            )
        metrics = gen.request_metrics() if timed else None
        out = CompletionResponse(id=response_id, model=served.name, choices=choices, usage=_usage(gen), metrics=metrics)
        return JSONResponse(out.to_dict())

    # --- embeddings ----------------------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        inputs, cap = body.inputs(), self.settings.max_prompts_per_request
        if len(inputs) > cap:
            raise too_many_prompts(cap, len(inputs), param="input")
        served = await self._admit(body.model, len(inputs), 1, task="embed")
        info, tokenizer = served.info, served.tokenizer
        assert tokenizer is not None
        check_dimensions(info, served.name, body.dimensions)
        prompts = await input_token_ids(tokenizer, inputs, info, body.truncate_prompt_tokens)
        timeout = self.settings.request_timeout
        gen = Generation(served, prompts, SamplingParams(max_tokens=1), 1, [], self.metrics, timeout, None)
        await self.collect(gen, request)
        self.metrics.embedding_inputs.labels(served.name).inc(len(prompts))
        data = [
            EmbeddingData(
                index=c.index,
                embedding=vector(c.embedding or b"", body.dimensions, info.embedding_normalized, body.encoding_format),
            )
            for c in gen.choices
        ]
        tokens = gen.num_prompt_tokens
        out = EmbeddingResponse(
            data=data, model=served.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )
        return JSONResponse(out.to_dict())

    # --- shared --------------------------------------------------------------------------------------------------

    async def collect(self, gen: Generation, request: Request) -> None:
        """Run to the end; a client that disconnects meanwhile (or a cancelled handler) aborts every choice."""

        async def consume() -> None:
            async for _ in gen.events():
                pass

        gen.start()
        work = asyncio.create_task(consume())
        try:
            async with cancel_on_disconnect(request.receive) as disconnected:
                await asyncio.wait({work, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "client closed the request", code="client_closed")
            work.result()
        finally:
            work.cancel()
            gen.close()

    def _stream(
        self, gen: Generation, prelude: list[str], chunk: ChunkBuilder, usage: Callable[[], str] | None
    ) -> StreamingResponse:
        """The generation starts when the response does, and ends with it however it ends (see GenerationStream)."""

        async def body() -> AsyncIterator[str]:
            try:
                for event in prelude:
                    yield event
                async for delta in gen.events():
                    if delta is None:
                        yield SSE_KEEPALIVE
                    elif delta.text or delta.choice.finish_reason or delta.logprobs:
                        event = chunk(delta)
                        if event:
                            yield event
                if usage is not None:
                    yield usage()
            except APIError as exc:
                yield f"data: {exc.to_body().to_json()}\n\n"
            finally:
                gen.close()
            yield SSE_DONE

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return GenerationStream(gen, body(), headers)


_TASKS = {"embed": "an embedding model", "generate": "a generation model"}


def _finish(reason: str | None, tool_calls: bool = False) -> Any:
    """The engine's reasons map onto OpenAI's; an abort only reaches a client that is still there by a timeout.
    A reply that ended by itself after making tool calls finished with 'tool_calls'."""
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls and reason == "stop" else "stop"


def _generic_tools(served: ServedModel, tokenizer: Tokenizer) -> bool:
    """Whether tools go to this model in the generic prompt: its template teaches none, and models.yaml neither
    refuses tools nor names another format."""
    return served.entry.tool_parser in ("auto", GENERIC_FORMAT) and not teaches_tools(tokenizer.chat_template)


def _thinking(served: ServedModel, tokenizer: Tokenizer, prompt: list[int]) -> bool | None:
    """None where the model's replies are not split into reasoning and content; else whether the prompt's end (the
    generation prompt) opened the thinking."""
    if not parses_reasoning(served.entry.reasoning_parser, tokenizer.chat_template):
        return None
    return prompt_opens_thinking(tokenizer.decode(prompt[-_PROMPT_TAIL:], skip_special_tokens=False))


_PROMPT_TAIL = 16  # tokens: enough to hold `<think>` and the whitespace after it, however the vocabulary splits them


def _joined(first: tuple[str, str], second: tuple[str, str]) -> tuple[str, str]:
    return first[0] + second[0], first[1] + second[1]


def _tool_format(served: ServedModel, tokenizer: Tokenizer) -> ToolFormat:
    """The model's tool-call format: from models.yaml, or recognised in its chat template; 400 if it has none."""
    chosen = served.entry.tool_parser
    found = detect_format(tokenizer.chat_template) if chosen == "auto" else None if chosen == "none" else chosen
    if found is None:
        raise APIError.invalid_request(
            f"model '{served.name}' takes no tool definitions: models.yaml sets tool_parser none, or its chat template "
            "writes calls in a format tokenmill does not recognise (set tool_parser: hermes, llama3_json or mistral)",
            param="tools",
        )
    return found


def _forced_call(
    tool_format: ToolFormat | None, tokenizer: Tokenizer, tools: list[dict[str, Any]], parallel: bool
) -> StructuredOutput:
    """The grammar of the call(s) that tool_choice forces: exactly one (a named function, or parallel calls off),
    or one or more. The grammar ends there, so the output ends too."""
    assert tool_format is not None
    special = {tokenizer.fast.id_to_token(i) or "": i for i in tokenizer.special_ids}
    grammar = forced_call_grammar(tool_format, tools, parallel, special)
    return StructuredOutput("grammar", grammar, "tools")  # checked with every other constraint (GrammarCheck)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _prompt_logprobs(choice: Choice, k: int | None) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs of a choice's prompt, where the request asks for them."""
    if k is None or choice.prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(choice.detok, choice.prompt_logprobs, k)


def _usage(gen: Generation) -> Usage:
    return Usage.of(gen.num_prompt_tokens, gen.num_completion_tokens, gen.num_cached_tokens)

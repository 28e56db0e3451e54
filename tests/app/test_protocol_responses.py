"""The OpenAI response types: our JSON is OpenAI's, and the official `openai` client reads it, streams included."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChunk

from app.protocol import ChatCompletionRequest, CompletionRequest
from app.protocol_responses import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    TextEvents,
    TokenizeResponse,
    TopLogprob,
    Usage,
)


def test_chat_response_json_is_openais() -> None:
    response = ChatCompletionResponse(
        id="chatcmpl-1",
        created=1700000000,
        model="smollm2",
        choices=[ChatChoice(index=0, message=ChatResponseMessage(content="Hello!"), finish_reason="stop")],
        usage=Usage.of(prompt_tokens=9, completion_tokens=3, cached_tokens=8),
    )
    assert json.loads(response.to_json()) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "smollm2",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
    }
    parsed = ChatCompletion.model_validate(response.to_dict())
    assert parsed.choices[0].message.content == "Hello!"
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 8


def test_chat_logprobs_json_is_openais() -> None:
    logprobs = ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token="Hi",
                logprob=-0.25,
                bytes=[72, 105],
                top_logprobs=[
                    TopLogprob(token="Hi", logprob=-0.25, bytes=[72, 105]),
                    TopLogprob(token="Yo", logprob=float("-inf")),
                ],
            )
        ]
    )
    assert logprobs.to_dict() == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.25,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                    {"token": "Yo", "logprob": -9999.0, "bytes": None},
                ],
            }
        ]
    }
    choice = ChatChoice(index=0, message=ChatResponseMessage(content="Hi"), logprobs=logprobs, finish_reason="length")
    response = ChatCompletionResponse(id="c", model="m", choices=[choice])
    parsed = ChatCompletion.model_validate(response.to_dict())
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].logprob == -9999.0


def chat_stream() -> list[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-2", created=1700000000, model="m", choices=choices, usage=usage)

    return [
        chunk([ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))]),
        chunk([ChatChunkChoice(index=0, delta=ChatDelta(content="Hel"))]),
        chunk([ChatChunkChoice(index=0, delta=ChatDelta(content="lo"))]),
        chunk([ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="stop")]),
        chunk([], Usage.of(5, 2)),
    ]


def test_chat_chunk_json_is_openais() -> None:
    first, middle, _, last, usage = (chunk.to_dict() for chunk in chat_stream())
    head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    assert first == head | {
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]
    }
    assert middle["choices"] == [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}]
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert usage == head | {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    for chunk in chat_stream():
        OpenAIChunk.model_validate(chunk.to_dict())


def completion_response() -> CompletionResponse:
    logprobs = CompletionLogprobs(
        tokens=[" a", "b"],
        token_logprobs=[-0.5, -1.0],
        top_logprobs=[{" a": -0.5, " c": -2.0}, {"b": -1.0}],
        text_offset=[4, 6],
    )
    return CompletionResponse(
        id="cmpl-3",
        created=1700000000,
        model="m",
        choices=[CompletionChoice(text=" ab", index=0, logprobs=logprobs, finish_reason="length")],
        usage=Usage.of(4, 2),
    )


def test_completion_json_is_openais() -> None:
    assert completion_response().to_dict() == {
        "id": "cmpl-3",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "text": " ab",
                "index": 0,
                "logprobs": {
                    "tokens": [" a", "b"],
                    "token_logprobs": [-0.5, -1.0],
                    "top_logprobs": [{" a": -0.5, " c": -2.0}, {"b": -1.0}],
                    "text_offset": [4, 6],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    parsed = Completion.model_validate(completion_response().to_dict())
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.text_offset == [4, 6]
    chunk = CompletionResponse(id="cmpl-3", model="m", choices=[CompletionChoice(text="x", index=0)])
    assert chunk.to_dict()["choices"] == [{"text": "x", "index": 0, "logprobs": None, "finish_reason": None}]


def test_small_bodies_json() -> None:
    assert ModelList(data=[ModelCard(id="m", created=1, max_model_len=2048)]).to_dict() == {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "tokenmill", "max_model_len": 2048}],
    }
    assert TokenizeResponse(tokens=[1, 2], count=2, max_model_len=8).to_dict() == {
        "tokens": [1, 2],
        "count": 2,
        "max_model_len": 8,
    }
    assert ErrorResponse(error=ErrorDetail(message="no", type="invalid_request_error")).to_dict() == {
        "error": {"message": "no", "type": "invalid_request_error", "param": None, "code": None}
    }
    assert chat_stream()[1].to_sse() == "data: " + chat_stream()[1].to_json() + "\n\n"


# --- the official client, end to end -----------------------------------------------------------------------------


def fake_server() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        if not request.stream:
            message = ChatResponseMessage(content=request.messages[-1].text().upper())
            choice = ChatChoice(index=0, message=message, finish_reason="stop")
            return JSONResponse(ChatCompletionResponse(id="c", model=request.model, choices=[choice]).to_dict())

        def events() -> Iterator[str]:
            yield from (chunk.to_sse() for chunk in chat_stream())
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> JSONResponse | StreamingResponse:
        if not request.stream:
            return JSONResponse(completion_response().to_dict())

        def events() -> Iterator[str]:
            steps: list[tuple[str, FinishReason | None]] = [("Hel", None), ("lo", "stop")]
            for text, finish in steps:
                choice = CompletionChoice(text=text, index=0, finish_reason=finish)
                yield CompletionResponse(id="cmpl-4", model=request.model, choices=[choice]).to_sse()
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def client() -> openai.OpenAI:
    return openai.OpenAI(
        api_key="x", base_url="http://testserver/v1", http_client=TestClient(fake_server()), max_retries=0
    )


def test_openai_client_sends_what_we_accept_and_reads_what_we_send(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=5,
        temperature=0,
        seed=1,
        stop=["x"],
        logit_bias={"5": 1},
        logprobs=True,
        top_logprobs=2,
        user="u",
    )
    assert reply.choices[0].message.content == "HI"
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
    text = client.completions.create(model="m", prompt=[1, 2, 3], max_tokens=2, logprobs=2, echo=False)
    assert text.choices[0].text == " ab"
    pieces = list(client.completions.create(model="m", prompt="x", stream=True))
    assert [(p.choices[0].text, p.choices[0].finish_reason) for p in pieces] == [("Hel", None), ("lo", "stop")]


@pytest.mark.parametrize(
    "text", ["Hello", ' "quoted" \\ back', "line\nbreak\ttab", "naïve 日本 🙂", "\x01\x1f ctrl", "", "\u2028"]
)
def test_text_events_render_what_pydantic_renders(text: str) -> None:
    def chat(index: int, piece: str) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(content=piece))
        return ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[choice])

    def completion(index: int, piece: str) -> CompletionResponse:
        choice = CompletionChoice(index=index, text=piece)
        return CompletionResponse(id="cmpl-1", created=7, model="m", choices=[choice])

    for render in (chat, completion):
        events = TextEvents(render)
        for index in (0, 3, 0):
            got = events.event(index, text)
            want = render(index, text).to_sse()
            assert got.startswith("data: ") and got.endswith("\n\n")
            assert json.loads(got[6:]) == json.loads(want[6:])

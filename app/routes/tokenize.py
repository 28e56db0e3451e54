"""vLLM's /tokenize and /detokenize, with the served model's own tokenizer and chat template."""

from __future__ import annotations

import asyncio

import msgspec
from fastapi import APIRouter
from fastapi.responses import Response

from app.dependencies import PoolDep
from app.errors import APIError
from app.model_pool import ModelPool, ServedModel
from app.preparation import decode, encode
from app.protocol import DetokenizeRequest, TokenizeRequest
from app.protocol_responses import DetokenizeResponse, TokenizeResponse
from app.tokenizer import ChatTemplateError, Tokenizer

router = APIRouter()


async def _model(pool: ModelPool, name: str | None) -> tuple[ServedModel, Tokenizer]:
    served = await pool.acquire(name or next(iter(pool.models)))
    assert served.tokenizer is not None
    return served, served.tokenizer


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, pool: PoolDep) -> Response:
    served, tokenizer = await _model(pool, body.model)
    if body.messages is not None:
        messages = [m.to_template() for m in body.messages]
        try:
            text = await asyncio.to_thread(tokenizer.render_chat, messages, body.add_generation_prompt)
        except ChatTemplateError as exc:
            raise APIError.invalid_request(str(exc), param="messages") from exc
    else:
        text = body.prompt or ""
    tokens = await encode(tokenizer, text, add_special_tokens=body.special_tokens)
    out = TokenizeResponse.model_construct(tokens=tokens, count=len(tokens), max_model_len=served.info.max_model_len)
    # A 4 MiB text is over a million ids: validating them again, then FastAPI's encoder, would hold the event loop for
    # seconds. They are the tokenizer's own ints, encoded as they are.
    return Response(msgspec.json.encode(dict(out)), media_type="application/json")


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, pool: PoolDep) -> dict[str, object]:
    served, tokenizer = await _model(pool, body.model)
    vocab = served.info.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise APIError.invalid_request(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=await decode(tokenizer, body.tokens)).to_dict()

"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens. Errors on these paths take Anthropic's
shape (app.errors); the anthropic-version and anthropic-beta headers are accepted and ignored."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.anthropic.messages import count_tokens, create_message
from app.anthropic.protocol import CountTokensRequest, MessagesRequest
from app.dependencies import ServingDep

router = APIRouter(prefix="/v1/messages")


@router.post("")
async def messages(body: MessagesRequest, request: Request, serving: ServingDep) -> Response:
    return await create_message(serving, body, request)


@router.post("/count_tokens")
async def messages_count_tokens(body: CountTokensRequest, serving: ServingDep) -> Response:
    return await count_tokens(serving, body)

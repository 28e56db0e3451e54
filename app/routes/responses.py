"""OpenAI's Responses API: POST /v1/responses, stateless (nothing is stored, so nothing can be retrieved or
continued). Errors take OpenAI's shape, as on every path outside /v1/messages."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.dependencies import ServingDep
from app.responses_api.create import create_response
from app.responses_api.protocol import ResponsesRequest

router = APIRouter(prefix="/v1")


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request, serving: ServingDep) -> Response:
    return await create_response(serving, body, request)

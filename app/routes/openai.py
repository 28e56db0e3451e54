"""OpenAI's endpoints: chat completions, completions, embeddings, and the model list."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from app.dependencies import PoolDep, ServingDep
from app.preparation import count_prompts, too_many_prompts
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.protocol_responses import ModelCard, ModelList


class PromptCapRoute(APIRoute):
    """Refuses a batch of completion prompts or embedding inputs over the cap before its body is validated (see
    `count_prompts`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def capped(request: Request) -> Response:
            cap = request.app.state.settings.max_prompts_per_request
            try:
                count = count_prompts(await request.body(), cap)
            except ClientDisconnect:
                count = None  # the handler meets it too, and answers it as it always has
            if count is not None and count > cap:
                raise too_many_prompts(cap, param="input" if request.url.path.endswith("/embeddings") else "prompt")
            return await handler(request)

        return capped


router = APIRouter(prefix="/v1")
batches = APIRouter(route_class=PromptCapRoute)  # included in `router` below


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep) -> Response:
    return await serving.chat(body, request)


@batches.post("/completions")
async def completions(body: CompletionRequest, request: Request, serving: ServingDep) -> Response:
    return await serving.completions(body, request)


@batches.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, serving: ServingDep) -> Response:
    return await serving.embeddings(body, request)


@router.get("/models")
async def list_models(pool: PoolDep) -> dict[str, object]:
    """Every model and alias, with its state, quantization, LoRA adapter and context length."""
    cards = []
    for name, model in pool.models.items():
        entry, info = model.entry, model.client.info
        for card_id in (name, *entry.aliases):
            cards.append(
                ModelCard(
                    id=card_id,
                    created=model.created,
                    root=name,
                    max_model_len=info.max_model_len if info else None,
                    state=pool.state(model),  # type: ignore[arg-type]
                    task=entry.task,
                    quantization=entry.quantization,
                    lora=entry.lora.adapter if entry.lora else None,
                    native_kernels=info.native_kernels if info else None,
                    native_kernels_reason=(info.native_kernels_reason or None) if info else None,
                )
            )
    return ModelList(data=cards).to_dict()


router.include_router(batches)

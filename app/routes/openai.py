"""OpenAI's endpoints: chat completions, completions, and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.dependencies import PoolDep, ServingDep
from app.protocol import ChatCompletionRequest, CompletionRequest
from app.protocol_responses import ModelCard, ModelList

router = APIRouter(prefix="/v1")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep) -> Response:
    return await serving.chat(body, request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, serving: ServingDep) -> Response:
    return await serving.completions(body, request)


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
                    quantization=entry.quantization,
                    lora=entry.lora.adapter if entry.lora else None,
                    native_kernels=info.native_kernels if info else None,
                    native_kernels_reason=(info.native_kernels_reason or None) if info else None,
                )
            )
    return ModelList(data=cards).to_dict()

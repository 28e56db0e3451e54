"""What routes receive through `Depends`: the serving layer, the model pool, the metrics, and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import APIError
from app.metrics import Metrics
from app.model_pool import ModelPool
from app.serving import Serving
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


def get_pool(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def key_matches(header: str | None, expected: str) -> bool:
    """Bearer-token check in constant time (the comparison does not leak how much of the key matched)."""
    scheme, _, token = (header or "").partition(" ")
    supplied = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(supplied.encode(), expected.encode())


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if settings.api_key is not None and not key_matches(request.headers.get("authorization"), settings.api_key):
        raise APIError.invalid_api_key()


def require_api_key_for_metrics(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if not settings.metrics_open:
        require_api_key(request, settings)


ServingDep = Annotated[Serving, Depends(get_serving)]
PoolDep = Annotated[ModelPool, Depends(get_pool)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

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


def key_matches(header: str | None, expected: list[str]) -> bool:
    """Bearer-token check in constant time (the comparison does not leak how much of a key matched); every key is
    compared, so the time does not say which one matched either."""
    scheme, _, token = (header or "").partition(" ")
    supplied = (token.strip() if scheme.lower() == "bearer" else "").encode()
    matched = False
    for key in expected:
        matched |= hmac.compare_digest(supplied, key.encode())
    return matched


def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.api_keys
    if keys and not key_matches(request.headers.get("authorization"), keys):
        raise APIError.invalid_api_key()


def require_api_key_for_metrics(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if not settings.metrics_open:
        require_api_key(request)


ServingDep = Annotated[Serving, Depends(get_serving)]
PoolDep = Annotated[ModelPool, Depends(get_pool)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

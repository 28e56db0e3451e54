"""What routes receive through `Depends`: the serving layer, the model pool, the metrics and the settings (API keys are
checked before routing, in app.auth)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

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


ServingDep = Annotated[Serving, Depends(get_serving)]
PoolDep = Annotated[ModelPool, Depends(get_pool)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

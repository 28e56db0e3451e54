"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.dependencies import MetricsDep, PoolDep
from app.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The API process is alive (says nothing about the models)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(pool: PoolDep) -> JSONResponse:
    """Every model is loaded and its worker connected; 503 names the ones that are not."""
    not_ready = pool.not_ready()
    if not_ready:
        return JSONResponse({"status": "not ready", "models": not_ready}, status_code=503)
    return JSONResponse({"status": "ready", "models": {name: "ready" for name in pool.models}})


@router.get("/metrics")  # behind the API key unless --metrics-open (app.auth)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)

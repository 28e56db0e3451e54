"""`create_app`: the FastAPI application. Workers start in the background, so /health answers at once and /ready
says when every model can serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from app.auth import ApiKeyGuard
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import Metrics
from app.model_pool import ModelPool
from app.reload import Reloader
from app.routes import admin, anthropic, health, openai, responses, tokenize
from app.serving import Serving
from app.settings import Settings
from app.supervisor import RestartPolicy

log = logging.getLogger("tokenmill")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    policy = RestartPolicy(
        max_restarts=settings.max_worker_restarts,
        watchdog=settings.watchdog_seconds,
        start_timeout=settings.worker_start_timeout,
    )
    pool = ModelPool(settings.registry(), metrics, settings.cache_dir, policy)
    pool.drain_timeout = settings.drain_timeout

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(pool.start(settings.worker_start_timeout))
        starting.add_done_callback(_log_start_failure)
        try:
            yield
        finally:
            starting.cancel()
            await pool.stop()

    app = FastAPI(title="tokenmill", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.reloader = Reloader(settings, pool)
    app.state.serving = Serving(pool, metrics, settings)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(tokenize.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    # Added last, runs first: header and declared-size limits, then the API key, then the streamed body; no body is
    # read for a client without a key.
    app.add_middleware(
        ApiKeyGuard, keys=settings.api_keys(), metrics_open=settings.metrics_open, admin_keys=settings.admin_keys()
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, read_timeout=settings.body_read_timeout)
    return app


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a model failed to start: %s", task.exception())

"""Re-reading models.yaml while serving, on SIGHUP or `POST /admin/reload`. A file that does not validate is refused
whole, and the registry being served stays as it was."""

from __future__ import annotations

import asyncio
import logging

from app.errors import APIError
from app.model_pool import ModelPool, ReloadReport
from app.settings import Settings
from worker.registry import RegistryError

log = logging.getLogger("tokenmill.reload")


async def reload_registry(settings: Settings, pool: ModelPool) -> ReloadReport:
    """Validate the registry file again (with the server's overrides) and apply it; APIError 400 if it is bad."""
    try:
        registry = await asyncio.to_thread(settings.registry)
    except RegistryError as exc:
        log.error("reload refused, still serving the previous registry: %s", exc)
        raise APIError.invalid_request(str(exc), code="invalid_registry") from exc
    return await pool.reload(registry)


async def reload_logged(settings: Settings, pool: ModelPool) -> None:
    """The SIGHUP path: nobody waits for an answer, so failures go to the log only."""
    try:
        await reload_registry(settings, pool)
    except APIError:
        pass  # logged above
    except Exception:
        log.exception("reload failed")

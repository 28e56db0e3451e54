"""Re-reading models.yaml while serving, on SIGHUP or `POST /admin/reload`. A file that does not validate is refused
whole, and the registry being served stays as it was. One reload at a time: a reload is in progress until the models
it added or replaced have loaded and the ones it removed or replaced have stopped, and another one meanwhile is
refused (409; on SIGHUP, logged and skipped) rather than stacked on top of it."""

from __future__ import annotations

import asyncio
import logging

from app.errors import APIError
from app.model_pool import ModelPool, ReloadReport
from app.settings import Settings
from worker.registry import RegistryError

log = logging.getLogger("tokenmill.reload")


def reload_in_progress(pending: list[str]) -> APIError:
    waiting = f" (waiting for: {', '.join(pending)})" if pending else ""
    message = f"A registry reload is already in progress{waiting}; retry once it is complete."
    return APIError(409, message, code="reload_in_progress")


class Reloader:
    """The server's one way to reload, shared by the admin route and the SIGHUP handler."""

    def __init__(self, settings: Settings, pool: ModelPool) -> None:
        self.settings = settings
        self.pool = pool
        self._reading = False  # a reload is reading the file (the pool cannot see that one yet)

    async def reload(self) -> ReloadReport:
        """Validate the registry file again (with the server's overrides) and apply it. APIError 400 if the file is
        bad, 409 if another reload is in progress."""
        if self._reading:
            raise reload_in_progress([])
        self._reading = True
        try:
            try:
                registry = await asyncio.to_thread(self.settings.registry)
            except RegistryError as exc:
                log.error("reload refused, still serving the previous registry: %s", exc)
                raise APIError.invalid_request(str(exc), code="invalid_registry") from exc
            pending = self.pool.settling()
            if pending:
                raise reload_in_progress(pending)
            return await self.pool.reload(registry)
        finally:
            self._reading = False

    async def reload_logged(self) -> None:
        """The SIGHUP path: nobody waits for an answer, so failures go to the log only."""
        try:
            await self.reload()
        except APIError as exc:
            if exc.status == 409:
                log.warning("SIGHUP reload skipped: %s", exc.message)
            # a bad file was logged above
        except Exception:
            log.exception("reload failed")

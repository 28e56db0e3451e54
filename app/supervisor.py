"""`Supervisor`: keeps one model's worker alive. A worker that dies is restarted with backoff, a bounded number of
times in a window, then the model is marked failed; a worker that shows no progress for `watchdog` seconds while
work is pending (deadlocked, or stopped; not merely in a long step: see app.liveness) is killed by the watchdog and
so restarted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.engine_client import EngineClient

log = logging.getLogger("tokenmill.supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3  # within `window` seconds; one more crash marks the model failed
    window: float = 300.0
    backoff: float = 0.5  # first delay; doubles with each crash in the window
    watchdog: float = 15.0  # seconds without progress (a step, or a heartbeat showing CPU use) while work is pending
    start_timeout: float = 600.0

    @property
    def heartbeat(self) -> float:
        """How often a worker reports progress: four times a watchdog period, so that a healthy worker never looks
        stalled for more than three quarters of it (an interval credited back, one waited for, one check period)."""
        return self.watchdog / 4


class Supervisor:
    def __init__(self, client: EngineClient, policy: RestartPolicy, on_failed: Callable[[str], None]) -> None:
        self.client = client
        self.policy = policy
        self.on_failed = on_failed
        self.crashes: list[float] = []
        self.restarts = 0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.client.on_lost = self._lost
        self._spawn(self._watchdog())

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, reason: str) -> None:
        """Decides at once, before the failed requests are answered, whether a restart follows (they say so)."""
        if self.stopping:
            return
        log.error("%s", reason)
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < self.policy.window] + [now]
        if len(self.crashes) > self.policy.max_restarts:
            gave_up = f"gave up after {self.policy.max_restarts} restarts in {self.policy.window:.0f} s"
            self.client.mark_failed(f"The worker for model '{self.client.name}' kept failing; {gave_up}.")
            self.on_failed(f"{reason}; {gave_up}")
            return
        self._spawn(self._restart())

    async def _restart(self) -> None:
        delay = self.policy.backoff * 2 ** (len(self.crashes) - 1)
        log.warning("restarting the worker of '%s' in %.1f s (crash %d)", self.client.name, delay, len(self.crashes))
        await asyncio.sleep(delay)
        try:
            await self.client.start(self.policy.start_timeout, self.policy.heartbeat)
        except Exception as exc:
            self._lost(f"worker for model '{self.client.name}' failed to restart: {exc}")
            return
        self.restarts += 1
        log.info("worker of '%s' is back", self.client.name)

    async def _watchdog(self) -> None:
        period = min(1.0, self.policy.watchdog / 4)
        while True:
            await asyncio.sleep(period)
            client, now = self.client, time.monotonic()
            stalled = client.liveness.stalled(now)
            if client.ready and client.streams and stalled > self.policy.watchdog:
                log.error(
                    "worker of '%s': no progress for %.1f s with work pending (%s); killing it",
                    client.name,
                    stalled,
                    client.liveness.describe(now),
                )
                client.kill()

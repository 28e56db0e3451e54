"""`DrainingServer`: uvicorn with tokenmill's shutdown rules. The first SIGTERM/SIGINT drains: the listener stays up
so /ready and new requests get a clear 503 instead of a refusal, in-flight requests finish (up to the drain timeout),
then the process exits 0. A second signal exits at once. With no model left to serve, it exits (non-zero, see cli).
SIGHUP re-reads models.yaml (see app.reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

import uvicorn

from app.model_pool import ModelPool


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        pool: ModelPool,
        drain_timeout: float,
        reload: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config)
        self.pool = pool
        self.drain_timeout = drain_timeout
        self.drain_deadline = 0.0
        self.reload = reload
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own handling re-raises SIGTERM after its shutdown, so even a clean drain would exit -15.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        yield

    def _on_hangup(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and self.reload is not None:
            self._loop.call_soon_threadsafe(self._start_reload)

    def _start_reload(self) -> None:
        assert self.reload is not None
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.pool.draining:  # the second signal: go now
            self.should_exit = self.force_exit = True
            return
        self.pool.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.pool.all_failed():
            return True
        if self.pool.draining and (self.pool.in_flight() == 0 or time.monotonic() > self.drain_deadline):
            return True
        return await super().on_tick(counter)

"""`EngineClient`: the API process's side of one worker. Starts it, sends adds and aborts, and routes each step's
outputs to per-request queues. One reader task per worker; token ids in, token ids out, no torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.liveness import Liveness
from worker import transport
from worker.launcher import WorkerHandle, start_worker
from worker.messages import (
    AbortRequest,
    AddRequest,
    Heartbeat,
    ModelInfo,
    RequestOutput,
    SamplingParams,
    Shutdown,
    StepOutput,
)

log = logging.getLogger("tokenmill.engine_client")


class WorkerGone(RuntimeError):
    """The worker process died or closed its socket while requests were in flight. The text says how, for the log;
    clients get a fixed message instead (`APIError.worker_lost`)."""


@dataclass
class RequestStream:
    """Outputs of one engine request, in order; ends with an output that has a finish reason, or an exception."""

    request_id: str
    queue: asyncio.Queue[RequestOutput | Exception] = field(default_factory=asyncio.Queue)

    async def next(self) -> RequestOutput:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item


class EngineClient:
    def __init__(self, name: str, models_path: Path, max_waiting_requests: int, cache_dir: Path | None = None) -> None:
        self.name = name
        self.models_path = models_path
        self.max_waiting_requests = max_waiting_requests
        self.cache_dir = cache_dir
        self.info: ModelInfo | None = None
        self.streams: dict[str, RequestStream] = {}
        self._admitting: dict[asyncio.Task[Any], int] = {}  # engine requests reserved by API requests, not yet open
        self.liveness = Liveness()  # what the supervisor's watchdog judges
        self.on_step: list[Callable[[StepOutput], None]] = []
        self.error: str | None = None
        self.failed = False  # given up on: no restart will follow
        self.on_lost: Callable[[str], None] | None = None  # the supervisor's hook: the worker died or hung
        self._handle: WorkerHandle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    @property
    def ready(self) -> bool:
        return self._writer is not None and self.error is None

    async def start(self, start_timeout: float = 600.0, heartbeat_seconds: float = 1.0) -> None:
        """Start the worker (again, after a crash: the old process is reaped first)."""
        await self._close_handle()
        handle = await asyncio.to_thread(
            start_worker,
            self.models_path,
            self.name,
            cache_dir=self.cache_dir,
            start_timeout=start_timeout,
            heartbeat_seconds=heartbeat_seconds,
        )
        self._handle = handle
        self.info = handle.info
        await self._attach(handle.sock)

    async def _attach(self, sock: socket.socket) -> None:
        """Read the worker's frames from this (connected) socket from now on."""
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self.liveness.reset(time.monotonic())
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"tokenmill-reader-{self.name}")
        self.error = None

    def kill(self) -> None:
        """SIGKILL the worker (it works on a stopped process too); the reader then sees the socket close."""
        if self._handle is not None and self._handle.process.poll() is None:
            self._handle.process.kill()

    def mark_failed(self, reason: str) -> None:
        self.failed = True
        self.error = reason

    async def _close_handle(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            if handle.process.poll() is None and self.error is not None:
                handle.process.kill()
            await asyncio.to_thread(handle.close)

    async def stop(self) -> None:
        self.on_lost = None  # a worker that exits because we asked it to is not lost
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.write(transport.encode_frame(Shutdown()))
                await self._writer.drain()
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        await self._close_handle()

    @property
    def capacity(self) -> int:
        """Engine requests this model takes at once: one per running slot (max_num_seqs) plus its waiting queue."""
        return (self.info.max_num_seqs if self.info is not None else 0) + self.max_waiting_requests

    def num_in_flight(self) -> int:
        """Engine requests accepted here and not finished: reserved by API requests still preparing, or streams."""
        return sum(self._admitting.values()) + len(self.streams)

    def admit(self, count: int = 1) -> bool:
        """Reserves `count` engine requests (prompts x n) for the calling API request if the model has room for
        them, held until `admitted` (or until the request's task ends). All or nothing: never a part of them.

        A request awaits (chat template, tokenizing) between admission and submission; without the reservation, a
        burst would all pass the check before any of it counts.
        """
        if self.num_in_flight() + count > self.capacity:
            return False
        task = asyncio.current_task()
        if task is not None:
            if task not in self._admitting:
                task.add_done_callback(self._release)
            self._admitting[task] = self._admitting.get(task, 0) + count
        return True

    def admitted(self) -> None:
        """Drops the calling request's reservation: its streams are open now (`open_stream`) and count instead."""
        task = asyncio.current_task()
        if task is not None:
            self._admitting.pop(task, None)

    def _release(self, task: asyncio.Task[Any]) -> None:
        self._admitting.pop(task, None)

    def open_stream(self, request_id: str) -> RequestStream:
        """Registers a request's stream before it is submitted, so it counts as waiting from now on."""
        if not self.streams:
            self.liveness.work_arrived(time.monotonic())
        return self.streams.setdefault(request_id, RequestStream(request_id))

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream | None:
        """Sends the request whose stream `open_stream` registered; None, sending nothing, if it was aborted since
        (an abort that lands before the add must not leave the add to run with no one reading it)."""
        if self._writer is None or self.error is not None:
            self.streams.pop(request_id, None)
            raise WorkerGone(self.error or f"model '{self.name}' is not running")
        stream = self.streams.get(request_id)
        if stream is None:
            return None
        self._writer.write(transport.encode_frame(AddRequest(request_id, prompt_token_ids, params)))
        await self._writer.drain()
        return stream

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Tell the worker to drop these requests; their streams end here at once. Never awaits, so it is safe in
        cleanup code that runs while a task is being cancelled."""
        live = [rid for rid in request_ids if self.streams.pop(rid, None) is not None]
        if live and self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(transport.encode_frame(AbortRequest(live)))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = transport.from_worker_decoder.decode(await transport.read_frame(reader))
                if isinstance(message, StepOutput):
                    self._dispatch(message)
                elif isinstance(message, Heartbeat):
                    self.liveness.heartbeat(time.monotonic(), message)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail(f"worker for model '{self.name}' exited: {exc}")
        except transport.FrameTooLarge as exc:
            log.error("worker for model '%s' broke the frame protocol: %s", self.name, exc)
            self._fail(f"worker link for model '{self.name}' broke: {exc}")
        except Exception as exc:
            log.exception("reader for %s failed", self.name)
            self._fail(f"worker link for model '{self.name}' failed: {exc}")

    def _dispatch(self, message: StepOutput) -> None:
        self.liveness.stepped(time.monotonic())
        for out in message.outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue  # aborted here already
            if out.finish_reason is not None:
                del self.streams[out.request_id]
            stream.queue.put_nowait(out)
        for listener in self.on_step:
            listener(message)

    def _fail(self, reason: str) -> None:
        """The worker is gone; `reason` (how, with the OS's words) goes to the log through `on_lost`, never to a
        client."""
        self.error = f"The worker for model '{self.name}' stopped unexpectedly; it is being restarted."
        self._writer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.queue.put_nowait(WorkerGone(reason))
        if self.on_lost is not None:
            self.on_lost(reason)

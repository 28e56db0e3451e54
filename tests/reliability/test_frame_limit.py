"""A frame header from the worker that announces more than `MAX_FRAME` bytes is refused by the API process's reader
as soon as it arrives: an error in the log, the worker's requests failed, and no wait for (or buffer of) the
gigabytes it announced. The worker's end of a real socket pair plays a worker that went wrong."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest

from app.engine_client import EngineClient, WorkerGone
from worker import transport
from worker.messages import EngineStats, RequestOutput, StepOutput


async def feed_bad_frame(tmp_path: Path) -> tuple[EngineClient, list[object]]:
    client = EngineClient("tiny", tmp_path / "models.yaml", max_waiting_requests=4)
    ours, worker_end = socket.socketpair()
    with worker_end:
        await client._attach(ours)
        stream = client.open_stream("r1")
        # a good frame first: the link works until the bad header
        worker_end.sendall(transport.encode_frame(StepOutput(1, [RequestOutput("r1", [5])], EngineStats())))
        first = await asyncio.wait_for(stream.next(), 10)
        worker_end.sendall(struct.pack(">I", 0xFFFF_FFF0))  # and the socket stays open, sending nothing more
        second = await asyncio.wait_for(stream.queue.get(), 10)
        assert client._reader_task is not None
        await asyncio.wait_for(client._reader_task, 10)
        return client, [first, second]


def test_oversized_frame_from_the_worker_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="tokenmill.engine_client"):
        client, (first, second) = asyncio.run(feed_bad_frame(tmp_path))
    assert isinstance(first, RequestOutput) and first.new_token_ids == [5]
    assert isinstance(second, WorkerGone) and "exceeds" in str(second)
    assert not client.ready and not client.streams
    assert client.error is not None and "bytes" not in client.error  # what a client may see stays plain
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("broke the frame protocol" in m and str(transport.MAX_FRAME) in m for m in errors), errors

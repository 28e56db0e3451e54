"""The frame transport on real socket pairs: one checked header reader for both processes, and whole frames from
several threads at once."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import pytest

from worker import transport
from worker.messages import EngineStats, Heartbeat, StepOutput


def oversized_header() -> bytes:
    return struct.pack(">I", transport.MAX_FRAME + 1)


def test_frame_length_refuses_past_the_limit() -> None:
    assert transport.frame_length(struct.pack(">I", 0)) == 0
    assert transport.frame_length(struct.pack(">I", transport.MAX_FRAME)) == transport.MAX_FRAME
    with pytest.raises(transport.FrameTooLarge, match="exceeds"):
        transport.frame_length(oversized_header())
    with pytest.raises(transport.FrameTooLarge):
        transport.frame_length(b"\xff\xff\xff\xff")


def test_blocking_reader_refuses_an_oversized_header_at_once() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(oversized_header())  # and nothing after it: a reader that trusted it would wait forever
        ours.settimeout(5)
        with pytest.raises(transport.FrameTooLarge):
            transport.recv(ours, transport.from_worker_decoder)


def test_async_reader_refuses_an_oversized_header_at_once() -> None:
    async def read() -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            theirs.sendall(oversized_header())
            try:
                await asyncio.wait_for(transport.read_frame(reader), 5)
            finally:
                writer.close()

    with pytest.raises(transport.FrameTooLarge):
        asyncio.run(read())


def test_async_reader_reads_what_the_sender_sends() -> None:
    async def read(count: int) -> list[object]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            sender = transport.Sender(theirs)
            for step in range(count):
                sender.send(StepOutput(step, [], EngineStats()))
            frames = [await transport.read_frame(reader) for _ in range(count)]
            writer.close()
            return [transport.from_worker_decoder.decode(frame) for frame in frames]

    messages = asyncio.run(read(3))
    assert [m.step for m in messages if isinstance(m, StepOutput)] == [0, 1, 2]


def test_sender_keeps_frames_whole_across_threads() -> None:
    """The worker's loop and its heartbeat thread write to one socket: no frame may be cut by another."""
    ours, theirs = socket.socketpair()
    sender = transport.Sender(theirs)
    per_thread = 300

    def beats(tag: int) -> None:
        for i in range(per_thread):
            sender.send(Heartbeat(time.monotonic(), float(tag), i, 0.0))

    def steps() -> None:
        for i in range(per_thread):
            sender.send(StepOutput(i, [], EngineStats()))

    threads = [threading.Thread(target=beats, args=(1,)), threading.Thread(target=beats, args=(2,))]
    threads.append(threading.Thread(target=steps))
    with ours, theirs:
        for thread in threads:
            thread.start()
        ours.settimeout(10)
        received = [transport.recv(ours, transport.from_worker_decoder) for _ in range(3 * per_thread)]
        for thread in threads:
            thread.join()
    # every frame decoded, and each thread's frames arrived complete and in order
    for tag in (1.0, 2.0):
        assert [m.step for m in received if isinstance(m, Heartbeat) and m.cpu_seconds == tag] == list(
            range(per_thread)
        )
    assert [m.step for m in received if isinstance(m, StepOutput)] == list(range(per_thread))

"""Length-prefixed msgspec (MessagePack) frames over a Unix-domain socket: typed messages, never pickle.

A frame is a 4-byte big-endian length and the encoded message. Both processes use these helpers, and both read
frames through `frame_length`, so a corrupt or hostile length is refused before anything is allocated for it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import TypeVar

import msgspec

from worker.messages import FromWorker, ToWorker

MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)  # type: ignore[arg-type]
from_worker_decoder: msgspec.msgpack.Decoder[FromWorker] = msgspec.msgpack.Decoder(FromWorker)  # type: ignore[arg-type]


class ConnectionClosed(EOFError):
    pass


class FrameTooLarge(ValueError):
    """A frame header announced more than `MAX_FRAME` bytes: the stream is corrupt or the peer misbehaves."""


def encode_frame(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """The payload length a frame header announces; `FrameTooLarge` past the limit."""
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


def send(sock: socket.socket, message: msgspec.Struct) -> None:
    sock.sendall(encode_frame(message))


class Sender:
    """Sends whole frames on a socket that several threads write to, one frame at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: msgspec.Struct) -> None:
        frame = encode_frame(message)
        with self._lock:
            self._sock.sendall(frame)


def recv(sock: socket.socket, decoder: msgspec.msgpack.Decoder[T]) -> T:
    """Read one whole frame; raises `ConnectionClosed` when the peer is gone."""
    length = frame_length(_recv_exactly(sock, HEADER_SIZE))
    return decoder.decode(_recv_exactly(sock, length))


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The asyncio counterpart of `recv`: one frame's payload; `asyncio.IncompleteReadError` when the peer is gone."""
    length = frame_length(await reader.readexactly(HEADER_SIZE))
    return await reader.readexactly(length)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionClosed("peer closed the connection")
        buf += chunk
    return bytes(buf)

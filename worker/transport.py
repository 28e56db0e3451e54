"""Length-prefixed msgspec (MessagePack) frames over a Unix-domain socket: typed messages, never pickle.

A frame is a 4-byte big-endian length and the encoded message. Both processes use these helpers.
"""

from __future__ import annotations

import socket
import struct
from typing import TypeVar

import msgspec

from worker.messages import FromWorker, ToWorker

MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)  # type: ignore[arg-type]
from_worker_decoder: msgspec.msgpack.Decoder[FromWorker] = msgspec.msgpack.Decoder(FromWorker)  # type: ignore[arg-type]


class ConnectionClosed(EOFError):
    pass


def encode_frame(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


def send(sock: socket.socket, message: msgspec.Struct) -> None:
    sock.sendall(encode_frame(message))


def recv(sock: socket.socket, decoder: msgspec.msgpack.Decoder[T]) -> T:
    """Read one whole frame; raises `ConnectionClosed` when the peer is gone."""
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return decoder.decode(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionClosed("peer closed the connection")
        buf += chunk
    return bytes(buf)

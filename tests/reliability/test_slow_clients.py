"""Slow and greedy clients at the connection level (slowloris): request headers that drip, stall or never come are
cut off after --header-read-timeout with a 408, while other clients are served; past --max-connections a new
connection gets a quick 503 and is closed, while the open ones keep working."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry

HEADER_TIMEOUT = 3.0
MAX_CONNECTIONS = 8
SLACK = 4.0  # a loaded 2-core machine: the cut comes well before the timeout plus this
GIVE_UP = 15.0  # a client the server never cuts off stops waiting here (and the test fails)
REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("slow-clients")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    args = ("--header-read-timeout", str(HEADER_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))
    server = start_server(registry, tmp, *args)
    yield server
    assert server.stop() == 0


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=GIVE_UP)


def read_reply(sock: socket.socket) -> bytes:
    """One response (headers and a Content-Length body), or what came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def timed(client: Callable[[socket.socket], bytes], server: Server) -> tuple[float, bytes]:
    """Run `client` on a fresh connection; (seconds from connecting to the server's close, all it answered)."""
    with connect(server) as sock:
        start = time.monotonic()
        try:
            reply = client(sock)
        except TimeoutError:
            return time.monotonic() - start, b"<not cut off>"
        return time.monotonic() - start, reply


def dripping(sock: socket.socket) -> bytes:
    """A header line every 2 s, never the blank line that ends them."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    sock.settimeout(2.0)
    for line in range(int(GIVE_UP / 2)):
        try:
            if reply := sock.recv(65536):
                sock.settimeout(GIVE_UP)
                return reply + read_until_closed(sock)
        except TimeoutError:
            sock.sendall(b"X-Drip-%d: still here\r\n" % line)
    raise TimeoutError


def stalled(sock: socket.socket) -> bytes:
    """Half a header, then nothing."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
    return read_until_closed(sock)


def silent(sock: socket.socket) -> bytes:
    """Connects and never sends a byte."""
    return read_until_closed(sock)


def stalled_after_a_request(sock: socket.socket) -> bytes:
    """A kept-alive connection whose second request stalls: the deadline holds for every request, not the first."""
    sock.sendall(REQUEST)
    assert read_reply(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return read_until_closed(sock)


def slow_but_in_time(sock: socket.socket) -> bytes:
    """Headers in two halves 1 s apart: slower than one packet, well within the deadline."""
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    time.sleep(1.0)
    sock.sendall(b"Host: 127.0.0.1\r\n\r\n")
    return read_reply(sock)


def test_slow_headers_are_cut_off_while_other_clients_are_served(server: Server) -> None:
    cases: dict[str, Callable[[socket.socket], bytes]] = {
        "dripping": dripping,
        "stalled": stalled,
        "silent": silent,
        "stalled after a request": stalled_after_a_request,
    }
    served = 0
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        futures: dict[str, Future[tuple[float, bytes]]] = {
            name: pool.submit(timed, client, server) for name, client in cases.items()
        }
        within_timeout = pool.submit(timed, slow_but_in_time, server)
        with server.client(timeout=30) as client:
            while not all(future.done() for future in futures.values()):
                response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
                assert response.status_code == 200, response.text
                served += 1
                time.sleep(0.2)
        for name, future in futures.items():
            elapsed, reply = future.result()
            assert reply.startswith(b"HTTP/1.1 408"), f"{name}: {reply[:300]!r}"
            assert b'"code": "request_timeout"' in reply, f"{name}: {reply!r}"
            assert HEADER_TIMEOUT - 0.5 < elapsed < HEADER_TIMEOUT + SLACK, f"{name}: cut off after {elapsed:.1f} s"
        assert within_timeout.result()[1].startswith(b"HTTP/1.1 200")
    assert served >= 3, "normal clients were not served while the slow ones were connected"


def open_served_connection(server: Server) -> socket.socket:
    """A kept-alive connection that has been served once (a connection of an earlier test may still be closing)."""
    deadline = time.monotonic() + 10
    while True:
        sock = connect(server)
        sock.sendall(REQUEST)
        reply = read_reply(sock)
        if reply.startswith(b"HTTP/1.1 200"):
            return sock
        sock.close()
        assert time.monotonic() < deadline, reply[:300]
        time.sleep(0.2)


def test_past_the_connection_cap_new_connections_get_a_quick_503(server: Server) -> None:
    held = [open_served_connection(server) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(server) as extra:
            start = time.monotonic()
            extra.sendall(REQUEST)
            reply = read_until_closed(extra)
            refused_in = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 503"), reply[:300]
        assert b'"code": "service_unavailable"' in reply and b"retry-after: 1" in reply.lower()
        assert refused_in < 2.0, f"the refusal took {refused_in:.1f} s"

        for sock in held:  # the open connections keep working (well within uvicorn's 5 s keep-alive)
            sock.sendall(REQUEST)
            assert read_reply(sock).startswith(b"HTTP/1.1 200")
        held.pop().close()
        open_served_connection(server).close()  # one closed: a new connection is served again
    finally:
        for sock in held:
            sock.close()

"""Hostile input at the HTTP layer: every case is refused with a clear status, and the server keeps serving."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("bad-input")
    entry = model_entry(tiny_llama_dir)
    server = start_server(write_registry(tmp / "models.yaml", [entry]), tmp, "--body-read-timeout", "1")
    yield server
    assert server.stop() == 0


@pytest.fixture(autouse=True)
def still_serving(server: Server) -> Iterator[None]:
    yield
    with server.client(timeout=30) as client:
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def post_raw(server: Server, content: bytes, **headers: str) -> httpx.Response:
    with server.client(timeout=30) as client:
        headers = {"content-type": "application/json", **headers}
        return client.post("/v1/chat/completions", content=content, headers=headers)


def test_invalid_utf8(server: Server) -> None:
    response = post_raw(server, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    error = response.json()["error"]
    assert response.status_code == 400 and (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert "not valid UTF-8" in error["message"]


def test_deeply_nested_json(server: Server) -> None:
    deep = b'{"model": "tiny", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    response = post_raw(server, deep)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_json" and "nested too deeply" in error["message"]


def test_ten_megabyte_body(server: Server) -> None:
    response = post_raw(server, b'{"model": "tiny", "prompt": "' + b"a" * 10_000_000 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_huge_header(server: Server) -> None:
    with server.client(timeout=30) as client:
        response = client.get("/health", headers={"x-junk": "j" * 100_000})
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"


def test_many_headers(server: Server) -> None:
    with server.client(timeout=30) as client:
        response = client.get("/health", headers={f"x-h{i}": "v" * 40 for i in range(2_000)})
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"


def test_slow_drip_body_is_cut_off(server: Server) -> None:
    body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body[:5])
        start = time.monotonic()
        reply = b""
        for byte in body[5:]:
            time.sleep(1.5)  # slower than --body-read-timeout 1
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.01)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                reply += sock.recv(65536)
            sock.settimeout(10)
            if reply:
                break
        if not reply:
            reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply
    assert time.monotonic() - start < 10

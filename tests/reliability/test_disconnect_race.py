"""A client that hangs up at any moment of a request leaves nothing running: not right after sending (the disconnect
lands before the response starts), not after the headers, not after the first chunk, not at a random moment, and not
when the client process is killed in the middle of its streams.

Each round drops a few connections at chosen moments over raw sockets (a FIN or a reset), or kills a client process
holding a few streams, then the engine's gauges must go back to idle. Steps are slowed, so a request that was not
aborted would run for 15 s or more.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import faults

ROUNDS = 50
STREAMS = 4
MAX_TOKENS = 480  # with a 30 ms step delay, an unaborted request runs for 15 s or more
SETTLE = 3.0  # seconds the engine may take to be idle after the last hang-up of a round
# "pipelined": a second request follows on the same connection, so uvicorn tells the stream of the first nothing when
# the connection drops; its next write fails instead, outside the body generator
MOMENTS = ("sent", "headers", "first_chunk", "random", "pipelined")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("disconnect-race")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir, threads=1)])
    server = start_server(registry, tmp, env={faults.ENV: "slow:30"}, ready_timeout=120)
    try:
        yield server
    finally:
        server.stop()


def gauges(client: httpx.Client) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in ("tokenmill_num_requests_running", "tokenmill_num_requests_waiting"):
                found[sample.name] = sample.value
    return found


def idle(client: httpx.Client) -> bool:
    return not any(gauges(client).values())


def request_bytes(port: int, rng: random.Random, index: int, stream: bool) -> bytes:
    n = 2 if rng.random() < 0.25 else 1  # a second choice waits for the first one's prompt blocks
    common = {"model": "tiny", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream, "n": n}
    if rng.random() < 0.5:
        path, body = "/v1/completions", {**common, "prompt": f"Round robin {index}"}
    else:
        path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Hi {index}"}]}
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def read_until(sock: socket.socket, marker: bytes) -> None:
    seen = b""
    while marker not in seen:
        data = sock.recv(65536)
        if not data:
            return
        seen += data


def hang_up(port: int, payload: bytes, moment: str, pause: float, reset: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(payload * 2 if moment == "pipelined" else payload)
        if moment == "headers":
            read_until(sock, b"\r\n\r\n")
        elif moment in ("first_chunk", "pipelined"):
            read_until(sock, b"data: ")
        elif moment == "random":
            time.sleep(pause)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def settled(client: httpx.Client) -> bool:
    """Idle within SETTLE seconds, after a moment for requests still being prepared to reach the engine (if they
    were going to)."""
    time.sleep(0.2)
    deadline = time.monotonic() + SETTLE
    while not idle(client) and time.monotonic() < deadline:
        time.sleep(0.02)
    return idle(client)


def test_hang_ups_at_any_moment_leave_nothing_running(server: Server) -> None:
    rng = random.Random(5)
    leak = ""
    with server.client(timeout=10) as client, ThreadPoolExecutor(STREAMS) as pool:
        assert idle(client)
        for round_index in range(ROUNDS):
            plan = []
            for k in range(STREAMS):
                moment = MOMENTS[(round_index + k) % len(MOMENTS)]
                # now and then a non-streaming request, dropped while it waits for its answer (no headers come)
                stream = moment in ("headers", "first_chunk", "pipelined") or rng.random() < 0.7
                payload = request_bytes(server.port, rng, round_index * STREAMS + k, stream)
                plan.append((payload, moment, rng.uniform(0.0, 0.08), rng.random() < 0.5))
            list(pool.map(lambda args: hang_up(server.port, *args), plan))
            if not settled(client):
                leak = f"round {round_index} ({[moment for _, moment, _, _ in plan]}): {gauges(client)}"
                break  # what is left would run for seconds and blur the rounds after it
    assert not leak, f"requests were left running after a hang-up: {leak}"


# Opens the streams it is given (hex, one per line on stdin), says so, then reads them until it is killed.
CLIENT = """
import selectors, socket, sys
port, payloads = int(sys.argv[1]), [bytes.fromhex(line) for line in sys.stdin.read().split()]
selector = selectors.DefaultSelector()
for payload in payloads:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(payload)
    selector.register(sock, selectors.EVENT_READ)
print("sent", flush=True)
while True:
    for key, _ in selector.select():
        key.fileobj.recv(65536)
"""


def test_a_killed_client_process_leaves_nothing_running(server: Server) -> None:
    rng = random.Random(7)
    with server.client(timeout=10) as client:
        assert idle(client)
        for round_index in range(12):
            payloads = [request_bytes(server.port, rng, round_index * STREAMS + k, True) for k in range(STREAMS)]
            process = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(server.port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write("\n".join(p.hex() for p in payloads))
                process.stdin.close()
                assert process.stdout.readline().strip() == "sent"
                time.sleep(rng.uniform(0.0, 0.4))  # before the headers, or some chunks into the streams
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
            assert settled(client), f"round {round_index}: requests left running after the kill: {gauges(client)}"

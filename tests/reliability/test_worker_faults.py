"""Faults against a real server and worker: a killed worker, a hung worker, a failing forward, out of memory.

Every in-flight request gets a clear error, /ready reports the outage, the supervisor restarts the worker, and new
requests succeed once it is back. Nothing hangs: every call has a bounded timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.server_harness import Server, model_entry, start_server, wait_until, write_registry

MARK = 7  # a prompt holding this token id makes the worker's step fail (TOKENMILL_TEST_FAULT)
LOST = "The worker for model 'tiny' stopped unexpectedly; it is being restarted. Retry the request."


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("faults")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp, "--watchdog-seconds", "2", "--max-worker-restarts", "10")
    yield server
    assert server.stop() == 0


def worker_pid(server: Server) -> int:
    children = psutil.Process(server.process.pid).children(recursive=True)
    workers = [p for p in children if "worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in children]
    return workers[0].pid


def completion(client: httpx.Client, prompt: list[int] | str = "hello", **body: Any) -> httpx.Response:
    payload = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **body}
    return client.post("/v1/completions", json=payload)


def running(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('tokenmill_num_requests_running{model_name="tiny"}'):
            return float(line.split()[-1])
    raise AssertionError("no running gauge")


def long_stream(server: Server, events: list[str], started: threading.Event) -> None:
    body = {"model": "tiny", "prompt": "count", "max_tokens": 490, "ignore_eos": True, "stream": True}
    with server.client(timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line:
                events.append(line)
                started.set()


def test_killed_worker_fails_in_flight_requests_and_comes_back(server: Server) -> None:
    events: list[str] = []
    started = threading.Event()
    streaming = threading.Thread(target=long_stream, args=(server, events, started))
    streaming.start()
    assert started.wait(30)
    with server.client(timeout=60) as client:
        pending: list[httpx.Response] = []
        blocking = threading.Thread(target=lambda: pending.append(completion(client, max_tokens=490, ignore_eos=True)))
        blocking.start()
        wait_until(lambda: running(client) == 2, 10, "both running", interval=0.05)
        os.kill(worker_pid(server), signal.SIGKILL)
        took = wait_until(lambda: client.get("/ready").status_code == 503, 2.0, "unready", interval=0.05)
        assert took < 2.0
        streaming.join(30)
        blocking.join(30)
        assert not streaming.is_alive() and not blocking.is_alive()
        # the stream ends with an OpenAI-shaped error event, then [DONE]; both say the same short fixed thing
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error == {"message": LOST, "type": "server_error", "param": None, "code": "worker_restarting"}
        assert pending[0].status_code == 503 and pending[0].json()["error"] == error
        assert pending[0].headers["retry-after"] == "5"
        assert "worker for model 'tiny' exited: " in server.log()  # how it went is in the log
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "ready again", interval=0.05)
        again = completion(client)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8


def test_hung_worker_is_killed_by_the_watchdog(server: Server) -> None:
    with server.client(timeout=60) as client:
        assert completion(client).status_code == 200
        pid = worker_pid(server)
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            response = completion(client, max_tokens=50)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["message"] == LOST
            assert time.monotonic() - start < 15
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "ready again", interval=0.05)
        assert worker_pid(server) != pid
        assert completion(client).status_code == 200


@pytest.mark.parametrize(("kind", "code"), [("raise", "model_error"), ("oom", "out_of_memory")])
def test_failed_step_fails_its_request_and_the_worker_survives(
    tiny_llama_dir: Path, tmp_path: Path, kind: str, code: str
) -> None:
    registry = write_registry(tmp_path / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp_path, env={"TOKENMILL_TEST_FAULT": f"{kind}:{MARK}"})
    try:
        with server.client(timeout=60) as client:
            bad = completion(client, prompt=[5, MARK, 9])
            assert bad.status_code == 500
            error = bad.json()["error"]
            assert error["type"] == "server_error" and error["code"] == code
            assert "injected" in error["message"]
            # the worker survived and serves the others, with nothing left running
            good = completion(client, prompt=[5, 6, 9])
            assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8
            assert client.get("/ready").status_code == 200
            assert running(client) == 0
    finally:
        assert server.stop() == 0


def test_worker_that_keeps_failing_takes_its_model_out_of_service(tiny_llama_dir: Path, tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp_path, "--max-worker-restarts", "0")
    try:
        with server.client(timeout=60) as client:
            pending: list[httpx.Response] = []
            blocking = threading.Thread(
                target=lambda: pending.append(completion(client, max_tokens=490, ignore_eos=True))
            )
            blocking.start()
            wait_until(lambda: running(client) == 1, 10, "running", interval=0.05)
            os.kill(worker_pid(server), signal.SIGKILL)
            blocking.join(30)
        error = pending[0].json()["error"]
        assert pending[0].status_code == 503 and error["code"] == "model_failed", error
        assert error["message"].startswith("The worker for model 'tiny' stopped unexpectedly")
        assert "restart" not in error["message"] and "bytes" not in error["message"]  # none will follow
        server.process.wait(30)  # with no model left to serve, the server exits by itself
        assert "gave up after 0 restarts" in server.log()
    finally:
        assert server.stop() == 1

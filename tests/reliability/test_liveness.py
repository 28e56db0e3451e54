"""The watchdog judges progress, not time between steps: a step three times as long as `--watchdog-seconds` that
computes all along completes, while a deadlocked worker (heartbeats, but no CPU) and a stopped one (no heartbeats),
even in the middle of a long step, are killed within the watchdog period and restarted; their requests get a short
fixed 503, streamed or not, never the socket error that the log keeps.
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
import pytest

from tests.server_harness import Server, model_entry, start_server, wait_until, worker_pids, write_registry
from worker import faults

WATCHDOG = 2.0
BUSY_MS = 3 * int(WATCHDOG * 1000)
BUSY, HANG = 7, 8  # a prompt holding one of these token ids makes its step compute for BUSY_MS, or hang forever
LOST = "The worker for model 'tiny' stopped unexpectedly; it is being restarted. Retry the request."


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("liveness")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    args = ("--watchdog-seconds", str(WATCHDOG), "--max-worker-restarts", "10")
    server = start_server(registry, tmp, *args, env={faults.ENV: f"busy:{BUSY}:{BUSY_MS},hang:{HANG}"})
    yield server
    assert server.stop() == 0


def completion(client: httpx.Client, prompt: list[int], **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "temperature": 0, **body})


def stream_events(server: Server, prompt: list[int], events: list[str]) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": True}
    with server.client(timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as response:
        events.extend(line for line in response.iter_lines() if line)


def assert_worker_lost(error: dict[str, Any]) -> None:
    assert error == {"message": LOST, "type": "server_error", "param": None, "code": "worker_restarting"}


def back_with_a_new_worker(server: Server, client: httpx.Client, old_pid: int) -> None:
    wait_until(lambda: client.get("/ready").status_code == 200, 60, "ready again", interval=0.05)
    assert worker_pids(server)["tiny"] != old_pid
    again = completion(client, [5, 6, 9], max_tokens=4)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def test_a_step_three_times_the_watchdog_completes(server: Server) -> None:
    with server.client(timeout=60) as client:
        pid = worker_pids(server)["tiny"]
        start = time.monotonic()
        response = completion(client, [5, BUSY, 9], max_tokens=1)
        took = time.monotonic() - start
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 1
        assert took >= BUSY_MS / 1000  # the step really outlasted the watchdog, three times over
        assert worker_pids(server)["tiny"] == pid
        assert "killing it" not in server.log()


def test_deadlocked_worker_is_killed_and_its_requests_get_a_clean_503(server: Server) -> None:
    with server.client(timeout=60) as client:
        pid = worker_pids(server)["tiny"]
        events: list[str] = []
        start = time.monotonic()
        streaming = threading.Thread(target=stream_events, args=(server, [5, HANG, 9], events))
        streaming.start()
        waiting = completion(client, [HANG, 10], max_tokens=4)  # in the hung step, or queued behind it
        took = time.monotonic() - start
        streaming.join(30)
        assert not streaming.is_alive()
        assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5"
        assert_worker_lost(waiting.json()["error"])
        assert events[-1] == "data: [DONE]"
        assert_worker_lost(json.loads(events[-2].removeprefix("data: "))["error"])
        # within the watchdog period plus the check period, with room for a loaded machine
        assert took < WATCHDOG + 4
        assert "no progress for" in server.log() and "between steps" not in server.log()
        back_with_a_new_worker(server, client, pid)


def test_stopped_worker_is_killed_even_in_a_long_step(server: Server) -> None:
    with server.client(timeout=60) as client:
        pid = worker_pids(server)["tiny"]
        result: list[httpx.Response] = []
        busy = threading.Thread(target=lambda: result.append(completion(client, [5, BUSY, 9], max_tokens=1)))
        start = time.monotonic()
        busy.start()
        time.sleep(WATCHDOG / 2)  # in the long step, with heartbeats showing it compute
        os.kill(pid, signal.SIGSTOP)
        try:
            busy.join(30)
            took = time.monotonic() - start
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert result[0].status_code == 503
        assert_worker_lost(result[0].json()["error"])
        assert took < BUSY_MS / 1000  # killed before the step could have ended
        back_with_a_new_worker(server, client, pid)

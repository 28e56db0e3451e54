"""Admission counts the work a request carries: prompts x n engine requests, against the model's running slots plus
its waiting queue. An idle model takes a burst up to that sum; a request that does not fit now gets 429 and one that
can never fit gets 400, with nothing of either run; prompt lists have a cap; and heavy bodies (a 4 MiB batch of tiny
prompts, a 4 MiB text to /tokenize) do not stall the event loop that serves everyone else.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import faults

MAX_NUM_SEQS = 8
MAX_WAITING = 4
CAPACITY = MAX_NUM_SEQS + MAX_WAITING
MAX_PROMPTS = 32
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("admission")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir, MODEL, threads=1)])
    # 10 ms more per engine step: a 100-token request lasts over a second however fast the machine is
    env = {faults.ENV: "slow:10", "TOKENMILL_MAX_PROMPTS_PER_REQUEST": str(MAX_PROMPTS)}
    args = ("--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING))
    server = start_server(registry, tmp, *args, env=env, ready_timeout=120)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=60.0) as client:
        wait_idle(client)
        yield client


def metrics(client: httpx.Client) -> dict[str, float]:
    """The tiny model's unlabelled-by-reason series, and counters summed over their other labels."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model_name") == MODEL:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def wait_idle(client: httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(client)
        if now["tokenmill_num_requests_running"] == 0 and now["tokenmill_num_requests_waiting"] == 0:
            return
        assert time.monotonic() < deadline, f"the engine is not idle: {now}"
        time.sleep(0.05)


def completion(prompt: Any, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- a burst against an idle model -------------------------------------------------------------------------------


async def _burst(base_url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as http:
        bodies = [completion(f"Burst request {i}.", 100) for i in range(count)]
        return list(await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies)))


def test_an_idle_model_takes_a_burst_up_to_its_slots_plus_its_queue(server: Server, client: httpx.Client) -> None:
    before = metrics(client)
    responses = asyncio.run(_burst(server.base_url, 60))
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) == CAPACITY, [r.status_code for r in responses]
    for response in refused:
        assert_error(response, 429, "rate_limit_exceeded", None)
        assert int(response.headers["retry-after"]) >= 1
    for response in accepted:
        assert response.json()["usage"]["completion_tokens"] == 100
    after = metrics(client)
    assert after["tokenmill_requests_rejected_total"] - before["tokenmill_requests_rejected_total"] == len(refused)


# --- work that does not fit -------------------------------------------------------------------------------------


def test_more_completions_than_the_model_ever_holds_is_a_400_and_nothing_runs(client: httpx.Client) -> None:
    before = metrics(client)
    prompts = [f"prompt {i}" for i in range(CAPACITY + 1)]
    assert_error(client.post("/v1/completions", json=completion(prompts, 50)), 400, "too_many_completions", "prompt")
    body = completion(["one", "two", "three", "four"], 50, n=4)  # 16 engine requests
    assert_error(client.post("/v1/completions", json=body), 400, "too_many_completions", "n")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": CAPACITY + 1}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, "too_many_completions", "n")
    after = metrics(client)
    moved = ("tokenmill_generation_tokens_total", "tokenmill_prompt_tokens_total", "tokenmill_iteration_tokens_count")
    for name in moved:
        assert after[name] == before[name], f"{name} moved: part of a refused request ran"


def test_a_prompt_list_over_the_cap_is_a_400(client: httpx.Client) -> None:
    before = metrics(client)
    prompts = ["x"] * (MAX_PROMPTS + 1)
    error = assert_error(client.post("/v1/completions", json=completion(prompts, 1)), 400, "too_many_prompts", "prompt")
    assert str(MAX_PROMPTS) in error["message"]
    token_lists = [[5]] * (MAX_PROMPTS + 1)
    assert_error(client.post("/v1/completions", json=completion(token_lists, 1)), 400, "too_many_prompts", "prompt")
    assert metrics(client)["tokenmill_iteration_tokens_count"] == before["tokenmill_iteration_tokens_count"]


def _stream_until_stopped(server: Server, started: threading.Event, stop: threading.Event) -> None:
    body = completion("Keep going.", 400, stream=True)
    with server.client(timeout=60.0) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                started.set()
            if stop.is_set():
                return


def test_a_batch_larger_than_the_free_room_is_refused_whole_while_busy(server: Server, client: httpx.Client) -> None:
    stop = threading.Event()
    started = [threading.Event() for _ in range(MAX_NUM_SEQS)]
    runners = [threading.Thread(target=_stream_until_stopped, args=(server, s, stop)) for s in started]
    for runner in runners:
        runner.start()
    try:
        assert all(event.wait(30) for event in started), "the long streams did not start"
        before = metrics(client)
        assert before["tokenmill_num_requests_running"] == MAX_NUM_SEQS
        # every running slot is taken: the waiting queue has room for 4 engine requests; this asks for 6
        response = client.post("/v1/completions", json=completion(["a", "b", "c"], 5, n=2))
        assert_error(response, 429, "rate_limit_exceeded", None)
        after = metrics(client)
        assert after["tokenmill_num_requests_waiting"] == 0
        assert after["tokenmill_prompt_tokens_total"] == before["tokenmill_prompt_tokens_total"]
        # 4 engine requests fit the queue exactly
        fits = client.post("/v1/completions", json=completion(["a", "b"], 5, n=2))
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["choices"]) == 4
    finally:
        stop.set()
        for runner in runners:
            runner.join(60)
    wait_idle(client)


# --- heavy bodies do not stall everyone else --------------------------------------------------------------------


def _hammer(server: Server, path: str, payload: bytes, stop: threading.Event, statuses: list[int]) -> None:
    headers = {"Content-Type": "application/json"}
    with server.client(timeout=120.0) as http:
        while not stop.is_set():
            statuses.append(http.post(path, content=payload, headers=headers).status_code)


def test_heavy_bodies_leave_small_requests_fast(server: Server, client: httpx.Client) -> None:
    many_prompts = json.dumps(completion(["a"] * 1_000_000, 1, n=128), separators=(",", ":")).encode()  # 4 MB
    long_text = json.dumps({"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog. " * 85_000})
    assert len(many_prompts) < 4 * 2**20 and len(long_text) < 4 * 2**20
    stop = threading.Event()
    statuses: dict[str, list[int]] = {"/v1/completions": [], "/tokenize": []}
    hammers = [
        threading.Thread(target=_hammer, args=(server, path, payload, stop, statuses[path]))
        for path, payload in (
            ("/v1/completions", many_prompts),
            ("/v1/completions", many_prompts),
            ("/tokenize", long_text.encode()),
        )
    ]
    latencies: list[float] = []
    for hammer in hammers:
        hammer.start()
    try:
        time.sleep(1.0)  # the heavy bodies are arriving
        for i in range(20):
            start = time.monotonic()
            response = client.post("/v1/completions", json=completion(f"small {i}", 4))
            latencies.append(time.monotonic() - start)
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        for hammer in hammers:
            hammer.join(120)
    assert statuses["/v1/completions"] and set(statuses["/v1/completions"]) == {400}, statuses
    assert statuses["/tokenize"] and set(statuses["/tokenize"]) == {200}, statuses
    latencies.sort()
    p99 = latencies[-1]  # of 20: the slowest
    assert p99 < 1.0, f"small requests took up to {p99:.2f} s (median {latencies[10]:.2f} s) beside heavy bodies"

"""SIGTERM drains (503 for new work, in-flight requests finish, exit 0; a second SIGTERM exits at once), and clients
that disconnect at random under load leave no request, block or gauge behind."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import faults


def tiny_server(tiny_llama_dir: Path, tmp: Path, *args: str) -> Server:
    entry = model_entry(tiny_llama_dir)
    return start_server(write_registry(tmp / "models.yaml", [entry]), tmp, *args)


def stream_to_end(server: Server, out: list[str], started: threading.Event, max_tokens: int) -> None:
    body = {"model": "tiny", "prompt": "drain", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with server.client(timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_sigterm_drains_then_exits_zero(tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = tiny_server(tiny_llama_dir, tmp_path, "--drain-timeout", "30")
    workers = psutil.Process(server.process.pid).children(recursive=True)
    events: list[str] = []
    started = threading.Event()
    # 490 tokens: the most the tiny model holds, so the stream outlasts the checks below on a fast engine too.
    thread = threading.Thread(target=stream_to_end, args=(server, events, started, 490))
    thread.start()
    assert started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    with server.client(timeout=10) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["models"] == {"tiny": "shutting down"}
        refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["message"] == "the server is shutting down"
    thread.join(60)
    assert events[-1] == "data: [DONE]"
    finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e[6:])["choices"]]
    assert finishes[-1] == "length"
    assert server.process.wait(30) == 0
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_second_sigterm_exits_at_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # 20 ms a step: the 490-token stream lasts about 10 s, so only the second signal can end it in time (without the
    # delay the tiny model streamed all of it before the second signal now and then)
    entry = model_entry(tiny_llama_dir)
    registry = write_registry(tmp_path / "models.yaml", [entry])
    server = start_server(registry, tmp_path, "--drain-timeout", "120", env={faults.ENV: "slow:20"})
    events: list[str] = []
    started = threading.Event()

    def stream_until_cut() -> None:
        try:
            stream_to_end(server, events, started, 490)
        except httpx.HTTPError:
            events.append("cut")  # the process went away mid-stream, as it should

    thread = threading.Thread(target=stream_until_cut, daemon=True)
    thread.start()
    assert started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    server.process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    server.process.wait(30)
    assert time.monotonic() - start < 15
    thread.join(30)
    assert events[-1] == "cut", "the stream should have been cut, not drained to its end"


async def one(client: httpx.AsyncClient, prompt: str, disconnect_after: int | None) -> str | None:
    """The full greedy text, or None when this client hangs up after `disconnect_after` chunks."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
    text: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            text.extend(c["text"] for c in choices)
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return None
    return "".join(text)


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name if "{" in name else name + "{") and 'model_name="tiny"' in line:
            return float(line.split()[-1])
    raise AssertionError(name)


def test_random_disconnects_under_load_leave_nothing_behind(tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = tiny_server(tiny_llama_dir, tmp_path, "--max-waiting-requests", "256")
    prompts = [f"prompt number {i % 10}" for i in range(200)]
    rng = random.Random(0)
    plan: list[int | None] = [rng.randint(1, 8) if rng.random() < 0.3 else None for _ in prompts]

    async def run_all() -> list[str | None]:
        limit = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:

            async def bounded(prompt: str, cut: int | None) -> str | None:
                async with limit:
                    return await one(client, prompt, cut)

            alone = [await one(client, f"prompt number {i}", None) for i in range(10)]
            results = await asyncio.gather(*(bounded(p, c) for p, c in zip(prompts, plan, strict=True)))
            return [*alone, *results]

    try:
        results = asyncio.run(asyncio.wait_for(run_all(), 240))
        alone, under_load = results[:10], results[10:]
        completed = [(p, r) for p, r in zip(prompts, under_load, strict=True) if r is not None]
        assert len(completed) == plan.count(None)
        for prompt, text in completed:
            assert text == alone[int(prompt.rsplit(" ", 1)[1])]
        with server.client() as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and metric(client, "tokenmill_num_requests_running") > 0:
                time.sleep(0.1)
            assert metric(client, "tokenmill_num_requests_running") == 0
            assert metric(client, "tokenmill_num_requests_waiting") == 0
            assert metric(client, "tokenmill_kv_cache_usage_perc") == 0
            # most hang-ups land while their request still runs: the abort reaches the worker
            assert metric(client, 'tokenmill_requests_aborted_total{model_name="tiny",reason="client_disconnect"') > 0
    finally:
        assert server.stop() == 0

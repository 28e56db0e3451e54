"""Backpressure, cancellation and metrics against a real `tokenmill serve` with the tiny model.

A model with every running slot and waiting place taken answers 429 with Retry-After; a client that goes away
(streaming, or queued behind others) frees its request in the worker; a request's own timeout ends it promptly;
/metrics shows all of it; SIGTERM stops every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import REPO, Server, model_entry, start_server, write_registry

MAX_WAITING = 4
MAX_NUM_SEQS = 4
MODEL = "tiny"
LONG = 480  # tokens: with the prompt, just under the tiny model's 512; seconds of work on CPU
DEADLINE = 15.0  # seconds any condition below may take to come true

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def registry(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = model_entry(tiny_llama_dir, MODEL, max_waiting_requests=MAX_WAITING, max_num_seqs=MAX_NUM_SEQS, threads=1)
    return write_registry(tmp_path_factory.mktemp("load-registry") / "models.yaml", [entry])


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(registry, tmp_path_factory.mktemp("load-logs"), ready_timeout=120)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=30.0) as client:
        wait_until(client, idle, "the server is idle before the test")
        yield client


# --- helpers -----------------------------------------------------------------------------------------------------


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series of the tiny model (0 when absent, as for a labelled counter not yet created)."""
    key = frozenset({"model_name": MODEL, **labels}.items())
    return samples.get((name, key), 0.0)


def idle(samples: Samples) -> bool:
    return (
        value(samples, "tokenmill_num_requests_running") == 0
        and value(samples, "tokenmill_num_requests_waiting") == 0
        and value(samples, "tokenmill_kv_cache_usage_perc") == 0
    )


def wait_until(client: httpx.Client, condition: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(client)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            gauges = {name: v for (name, _), v in samples.items() if "num_requests" in name or "kv_cache" in name}
            aborted = {dict(k)["reason"]: v for (n, k), v in samples.items() if n == "tokenmill_requests_aborted_total"}
            pytest.fail(f"not within {DEADLINE} s: {what}; gauges {gauges}, aborted {aborted}")
        time.sleep(0.05)


def aborted(samples: Samples, reason: str) -> float:
    return value(samples, "tokenmill_requests_aborted_total", reason=reason)


def chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def assert_openai_error(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code), error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- overload ----------------------------------------------------------------------------------------------------


async def _burst(base_url: str, count: int, max_tokens: int) -> list[tuple[httpx.Response, float]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:

        async def one(index: int) -> tuple[httpx.Response, float]:
            body = chat_body(max_tokens, messages=[{"role": "user", "content": f"Request number {index}."}])
            response = await client.post("/v1/chat/completions", json=body)
            return response, time.monotonic()

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_overload_gets_429_with_retry_after_and_accepted_requests_complete(
    server: Server, client: httpx.Client
) -> None:
    before = scrape(client)
    max_tokens = 200
    results = asyncio.run(_burst(server.base_url, 2 * (MAX_WAITING + MAX_NUM_SEQS), max_tokens))

    accepted = [(r, t) for r, t in results if r.status_code == 200]
    rejected = [(r, t) for r, t in results if r.status_code != 200]
    assert rejected, "a burst past the waiting queue must be refused in part"
    assert accepted, "the waiting queue itself must be admitted"
    for response, _ in rejected:
        assert_openai_error(response, 429, "requests", "rate_limit_exceeded")
        assert int(response.headers["retry-after"]) >= 1
    for response, _ in accepted:
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == max_tokens
    # When every refusal came before any completion, all accepted requests were in the server at once: an idle model
    # takes a request per running slot plus its waiting queue, and no more.
    if max(t for _, t in rejected) < min(t for _, t in accepted):
        assert len(accepted) == MAX_WAITING + MAX_NUM_SEQS, f"{len(accepted)} admitted at once"

    after = wait_until(client, idle, "the burst has drained")
    refused = value(after, "tokenmill_requests_rejected_total", reason="queue_full")
    assert refused - value(before, "tokenmill_requests_rejected_total", reason="queue_full") == len(rejected)
    succeeded = value(after, "tokenmill_request_success_total", finished_reason="length")
    assert succeeded - value(before, "tokenmill_request_success_total", finished_reason="length") == len(accepted)


# --- cancellation ------------------------------------------------------------------------------------------------


def test_streaming_client_disconnect_aborts_in_the_worker(server: Server, client: httpx.Client) -> None:
    before = scrape(client)
    with (
        server.client(timeout=30.0) as streamer,
        streamer.stream("POST", "/v1/chat/completions", json=chat_body(LONG, stream=True)) as response,
    ):
        assert response.status_code == 200
        chunks = 0
        running: Samples = {}
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 5:
                running = scrape(client)  # before leaving: breaking out of the lines closes the connection
                break
        assert value(running, "tokenmill_num_requests_running") == 1  # still generating when we leave
        assert value(running, "tokenmill_kv_cache_usage_perc") > 0

    after = wait_until(
        client,
        lambda s: aborted(s, "client_disconnect") > aborted(before, "client_disconnect") and idle(s),
        "the disconnected stream is aborted and its KV blocks freed",
    )
    assert aborted(after, "client_disconnect") == aborted(before, "client_disconnect") + 1
    assert value(after, "tokenmill_request_success_total", finished_reason="length") == value(
        before, "tokenmill_request_success_total", finished_reason="length"
    )


async def _queued_disconnect(server: Server, client: httpx.Client) -> None:
    started = [asyncio.Event() for _ in range(MAX_NUM_SEQS)]

    async def runner(http: httpx.AsyncClient, event: asyncio.Event) -> None:
        async with http.stream("POST", "/v1/chat/completions", json=chat_body(LONG, stream=True)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content":""' not in line:
                    event.set()

    def scraped() -> Samples:
        return scrape(client)

    async def until(condition: Callable[[Samples], bool], what: str) -> Samples:
        return await asyncio.to_thread(wait_until, client, condition, what)

    limits = httpx.Limits(max_connections=MAX_NUM_SEQS)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0, limits=limits) as http:
        runners = [asyncio.create_task(runner(http, event)) for event in started]
        try:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), DEADLINE)
            before = await asyncio.to_thread(scraped)

            queued_client = httpx.AsyncClient(base_url=server.base_url, timeout=60.0)
            queued = asyncio.create_task(queued_client.post("/v1/chat/completions", json=chat_body(LONG)))
            await until(
                lambda s: (
                    value(s, "tokenmill_num_requests_waiting") == 1
                    and value(s, "tokenmill_num_requests_running") == MAX_NUM_SEQS
                ),
                "the extra request waits behind the running ones",
            )
            queued.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queued
            await queued_client.aclose()

            after = await until(
                lambda s: (
                    aborted(s, "client_disconnect") == aborted(before, "client_disconnect") + 1
                    and value(s, "tokenmill_num_requests_waiting") == 0
                ),
                "the queued request is aborted in the worker",
            )
            # the others were not disturbed: they are still running
            assert value(after, "tokenmill_num_requests_running") == MAX_NUM_SEQS
            assert not any(task.done() for task in runners)
        finally:
            for task in runners:
                task.cancel()
            await asyncio.gather(*runners, return_exceptions=True)


def test_queued_non_streaming_client_disconnect_aborts_in_the_worker(server: Server, client: httpx.Client) -> None:
    before = scrape(client)
    asyncio.run(_queued_disconnect(server, client))
    after = wait_until(
        client,
        lambda s: (
            aborted(s, "client_disconnect") == aborted(before, "client_disconnect") + MAX_NUM_SEQS + 1 and idle(s)
        ),
        "every disconnected request is aborted and the engine is idle",
    )
    assert aborted(after, "timeout") == aborted(before, "timeout")


# --- timeout -----------------------------------------------------------------------------------------------------


def test_request_timeout_returns_an_error_promptly_and_frees_the_request(client: httpx.Client) -> None:
    before = scrape(client)
    start = time.monotonic()
    response = client.post("/v1/chat/completions", json=chat_body(LONG, timeout=0.1))
    elapsed = time.monotonic() - start
    error = assert_openai_error(response, 408, "timeout_error", "timeout")
    assert error["param"] is None
    assert elapsed < 3.0, f"took {elapsed:.2f} s for a 0.1 s timeout"
    wait_until(
        client,
        lambda s: aborted(s, "timeout") == aborted(before, "timeout") + 1 and idle(s),
        "the timed-out request is aborted",
    )


def test_streaming_request_timeout_ends_the_stream_with_an_error(client: httpx.Client) -> None:
    before = scrape(client)
    start = time.monotonic()
    events: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=chat_body(LONG, stream=True, timeout=0.1)) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"took {elapsed:.2f} s for a 0.1 s timeout"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "timeout")
    wait_until(
        client,
        lambda s: aborted(s, "timeout") == aborted(before, "timeout") + 1 and idle(s),
        "the timed-out stream is aborted",
    )


# --- metrics -----------------------------------------------------------------------------------------------------

GAUGES = ("tokenmill_num_requests_running", "tokenmill_num_requests_waiting", "tokenmill_kv_cache_usage_perc")
COUNTERS = (
    "tokenmill_prompt_tokens",
    "tokenmill_generation_tokens",
    "tokenmill_request_success",
    "tokenmill_num_preemptions",
    "tokenmill_prefix_cache_queries",
    "tokenmill_prefix_cache_hits",
    "tokenmill_requests_rejected",
    "tokenmill_requests_aborted",
    "tokenmill_grammar_mask_seconds",
    "tokenmill_grammar_wait_seconds",
    "tokenmill_spec_decode_num_drafts",
    "tokenmill_spec_decode_num_draft_tokens",
    "tokenmill_spec_decode_num_accepted_tokens",
)
HISTOGRAMS = (
    "tokenmill_time_to_first_token_seconds",
    "tokenmill_inter_token_latency_seconds",
    "tokenmill_e2e_request_latency_seconds",
    "tokenmill_request_queue_time_seconds",
    "tokenmill_request_prompt_tokens",
    "tokenmill_request_generation_tokens",
    "tokenmill_iteration_tokens",
)


def assert_every_family(text: str) -> None:
    """Each family is there with its type, and every series carries the model's label."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = (
        {name: "gauge" for name in GAUGES} | {n: "counter" for n in COUNTERS} | {n: "histogram" for n in HISTOGRAMS}
    )
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, f"{name} has no series"
        assert all(sample.labels.get("model_name") == MODEL for sample in family.samples), name
    assert all("finished_reason" in s.labels for s in families["tokenmill_request_success"].samples)
    assert all("reason" in s.labels for s in families["tokenmill_requests_rejected"].samples)
    assert all("reason" in s.labels for s in families["tokenmill_requests_aborted"].samples)


def test_metrics_families_are_all_present_with_the_model_label(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert_every_family(response.text)


def _completion(client: httpx.Client, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_metrics_move_as_requests_complete(client: httpx.Client) -> None:
    prompt = "A paged KV cache keeps the keys and values of every request in fixed-size blocks. " * 2
    max_tokens = 8

    def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    before = scrape(client)
    usage = _completion(client, prompt, max_tokens)["usage"]
    first = scrape(client)
    prompt_tokens = usage["prompt_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert prompt_tokens >= 32 and usage["completion_tokens"] == max_tokens
    assert delta(first, before, "tokenmill_prompt_tokens_total") == prompt_tokens
    assert delta(first, before, "tokenmill_generation_tokens_total") == max_tokens
    assert delta(first, before, "tokenmill_request_success_total", finished_reason="length") == 1
    # a step that keeps proposed tokens (speculative decoding, on by default here) sends them with its own
    proposed = delta(first, before, "tokenmill_spec_decode_num_draft_tokens_total")
    kept = delta(first, before, "tokenmill_spec_decode_num_accepted_tokens_total")
    assert 0 <= kept <= proposed
    for name in HISTOGRAMS[:4]:
        assert delta(first, before, f"{name}_count") == (max_tokens - 1 - kept if "inter_token" in name else 1), name
        assert delta(first, before, f"{name}_sum") > 0, name
    assert delta(first, before, "tokenmill_request_prompt_tokens_sum") == prompt_tokens
    assert delta(first, before, "tokenmill_request_generation_tokens_sum") == max_tokens
    # every token fed to the model is in some step: the uncached prompt, then all outputs but the last, less those
    # that were proposed and kept (fed as proposals), plus every proposed token
    fed = prompt_tokens - cached + max_tokens - 1 - kept + proposed
    assert delta(first, before, "tokenmill_iteration_tokens_sum") == fed
    assert delta(first, before, "tokenmill_iteration_tokens_count") >= max_tokens - kept
    assert delta(first, before, "tokenmill_prefix_cache_queries_total") == prompt_tokens
    assert delta(first, before, "tokenmill_num_preemptions_total") == 0

    # the same prompt again: its full blocks come from the prefix cache
    again = _completion(client, prompt, max_tokens)["usage"]
    second = scrape(client)
    assert again["prompt_tokens_details"]["cached_tokens"] >= 16
    hits = delta(second, first, "tokenmill_prefix_cache_hits_total")
    assert hits == again["prompt_tokens_details"]["cached_tokens"]
    assert value(second, "tokenmill_kv_cache_usage_perc") == 0  # cached blocks are free until reused


# --- processes ---------------------------------------------------------------------------------------------------


def test_importing_the_app_leaves_torch_out(registry: Path) -> None:
    code = (
        "import sys\n"
        "import app.main, app.cli\n"
        "from app.settings import Settings\n"
        f"app.main.create_app(Settings(models={str(registry)!r}))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_the_running_api_process_has_not_loaded_torch(server: Server) -> None:
    maps = Path(f"/proc/{server.process.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    assert "libtorch" not in maps.read_text()


def test_fresh_server_shows_every_metric_and_stops_on_sigterm(registry: Path, tmp_path: Path) -> None:
    server = start_server(registry, tmp_path, ready_timeout=120)
    workers: list[psutil.Process] = []
    try:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        assert workers, "the server runs its model in a worker process"
        with server.client(timeout=30.0) as client:
            assert_every_family(client.get("/metrics").text)  # before any request: dashboards see the model at once
            assert client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).is_success
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log()[-3000:]
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"worker processes left behind: {alive}"
    finally:
        server.stop()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()

"""Reloading models.yaml without a restart, on SIGHUP and on `POST /admin/reload`: an added model starts, a removed
one drains and stops, a changed one is replaced once its in-flight requests finish, and an unchanged model keeps
streaming throughout. A bad file is refused whole."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import Server, start_server, wait_until, worker_pids, write_registry

KEY = "reload-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def common(tiny_llama_dir: Path) -> dict[str, Any]:
    return {"source": str(tiny_llama_dir), "dtype": "float32", "kv_cache_memory": "8MiB"}


@pytest.fixture(scope="module")
def first(common: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "keep", "aliases": ["keep-old"], **common},
        {"name": "gone", **common},
        {"name": "change", "max_model_len": 400, **common},
    ]


@pytest.fixture(scope="module")
def second(common: dict[str, Any], tiny_qwen2_dir: Path) -> list[dict[str, Any]]:
    """keep: only its alias changes (no restart); gone: removed; change: a new max_model_len; new: added."""
    return [
        {"name": "keep", "aliases": ["keep-new"], **common},
        {"name": "change", "max_model_len": 320, **common},
        {"name": "new", **{**common, "source": str(tiny_qwen2_dir)}},
    ]


@pytest.fixture(scope="module")
def server(first: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("reload")
    server = start_server(write_registry(tmp / "models.yaml", first), tmp, "--api-key", KEY)
    yield server
    assert server.stop() == 0


def registry_path(server: Server) -> Path:
    return server.log_path.parent / "models.yaml"


def cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in client.get("/v1/models", headers=AUTH).json()["data"]}


def stream(client: httpx.Client, model: str, max_tokens: int, started: threading.Event | None = None) -> list[str]:
    """One streamed completion; returns its finish reasons and fails on any error event or status."""
    body = {
        "model": model,
        "prompt": "hello there",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    finish: list[str] = []
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if started is not None:
                started.set()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["finish_reason"]:
                    finish.append(choice["finish_reason"])
    assert tokens == max_tokens
    return finish


def test_sighup_adds_removes_and_replaces_while_an_unchanged_model_streams(
    server: Server, second: list[dict[str, Any]]
) -> None:
    before = worker_pids(server)
    assert set(before) == {"keep", "gone", "change"}
    stop = threading.Event()
    keep_done: list[list[str]] = []

    def keep_streaming() -> None:
        with server.client() as client:
            while not stop.is_set():
                keep_done.append(stream(client, "keep", 24))

    with server.client() as client, ThreadPoolExecutor(5) as pool:
        keepers = [pool.submit(keep_streaming) for _ in range(2)]
        started = {name: threading.Event() for name in ("gone", "change")}
        in_flight: dict[str, Future[list[str]]] = {
            name: pool.submit(stream, server.client(), name, 250, started[name]) for name in started
        }
        for event in started.values():
            assert event.wait(60)
        write_registry(registry_path(server), second)
        server.process.send_signal(signal.SIGHUP)

        def settled() -> bool:
            listed = cards(client)
            return (
                "gone" not in listed
                and listed.get("new", {}).get("state") == "loaded"
                and listed["change"]["state"] == "loaded"
                and listed["change"]["max_model_len"] == 320
            )

        wait_until(settled, 120, "the reloaded registry to be served")
        keeps_during_reload = len(keep_done)
        wait_until(
            lambda: len(keep_done) > keeps_during_reload or any(keeper.done() for keeper in keepers),
            30,
            "a request to 'keep' after the reload",
        )
        stop.set()
        for keeper in keepers:
            keeper.result(timeout=60)  # re-raises any error a 'keep' stream saw
        for name, future in in_flight.items():
            assert future.result(timeout=60) == ["length"], f"the in-flight request to '{name}' did not finish"

        after = worker_pids(server)
        assert after["keep"] == before["keep"], "an unchanged model's worker must keep running"
        assert after["change"] != before["change"], "a changed model runs in a new worker"
        wait_until(lambda: "gone" not in worker_pids(server), 30, "the removed model's worker to exit")
        assert "new" in after

        listed = cards(client)
        assert set(listed) == {"keep", "keep-new", "change", "new"}
        for model in ("gone", "keep-old"):
            answer = client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
            assert answer.status_code == 404, answer.text
        for model in ("keep-new", "change", "new"):
            answer = client.post(
                "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3}, headers=AUTH
            )
            assert answer.status_code == 200, answer.text
    assert "registry reloaded" in server.log()


def test_a_bad_registry_is_refused_whole(server: Server, second: list[dict[str, Any]], common: dict[str, Any]) -> None:
    path = registry_path(server)
    good = path.read_text()
    bad = [*second, {"name": "extra", "quantisation": "int8", **common}]
    write_registry(path, bad)
    try:
        with server.client() as client:
            models_before, pids_before = cards(client), worker_pids(server)
            assert client.post("/admin/reload").status_code == 401
            refused = client.post("/admin/reload", headers=AUTH)
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["code"] == "invalid_registry"
            assert "extra" in error["message"] and "quantisation" in error["message"]

            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: server.log().count("reload refused") >= 2, 30, "the SIGHUP reload to be refused")
            assert cards(client) == models_before and worker_pids(server) == pids_before
    finally:
        path.write_text(good)


def test_admin_reload_reports_what_changed(server: Server, second: list[dict[str, Any]]) -> None:
    write_registry(registry_path(server), [entry for entry in second if entry["name"] != "new"])
    with server.client() as client:
        answer = client.post("/admin/reload", headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "status": "reloaded",
            "added": [],
            "removed": ["new"],
            "replaced": [],
            "unchanged": ["keep", "change"],
        }
        assert "new" not in cards(client)
        wait_until(lambda: "new" not in worker_pids(server), 30, "the removed model's worker to exit")

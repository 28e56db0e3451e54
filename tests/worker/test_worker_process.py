"""The worker process over its real transport: start it, send requests and an abort, read step outputs and
heartbeats, stop it."""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from app.liveness import MIN_CPU_SHARE
from tests.server_harness import model_entry
from tests.worker.engine_harness import random_prompts, reference
from worker import transport
from worker.launcher import WorkerHandle, WorkerStartError, start_worker
from worker.messages import AbortRequest, AddRequest, Heartbeat, SamplingParams, StepOutput


@pytest.fixture(scope="module")
def registry(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "models.yaml"
    entry = model_entry(tiny_llama_dir, threads=1, kv_cache_memory="4MiB")
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@pytest.fixture(scope="module")
def worker(registry: Path) -> Iterator[WorkerHandle]:
    handle = start_worker(registry, "tiny", start_timeout=120, heartbeat_seconds=0.2)
    yield handle
    assert handle.close() == 0


def read_until(
    sock: socket.socket, done: set[str], timeout: float = 60.0
) -> tuple[dict[str, list[int]], dict[str, str]]:
    sock.settimeout(timeout)
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    while not done <= finish.keys():
        message = transport.recv(sock, transport.from_worker_decoder)
        if isinstance(message, Heartbeat):
            continue
        assert isinstance(message, StepOutput)
        seen = [o.request_id for o in message.outputs]
        assert len(seen) == len(set(seen)), "one output per request per step"
        for out in message.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                finish[out.request_id] = out.finish_reason
    return tokens, finish


def test_worker_reports_its_model(worker: WorkerHandle) -> None:
    assert worker.info.name == "tiny"
    assert worker.info.dtype == "float32"
    assert worker.info.kv_blocks_total > 0


def test_requests_and_abort_over_the_socket(worker: WorkerHandle, tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = random_prompts(int(model.config.vocab_size), [4, 9, 17], seed=11)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    for rid, prompt in prompts.items():
        transport.send(worker.sock, AddRequest(rid, prompt, greedy))
    transport.send(worker.sock, AddRequest("long", prompts["r0"], SamplingParams(max_tokens=400, ignore_eos=True)))
    transport.send(worker.sock, AbortRequest(["long"]))
    tokens, finish = read_until(worker.sock, {*prompts, "long"})
    assert finish["long"] == "abort"
    assert len(tokens.get("long", [])) < 400
    for rid, prompt in prompts.items():
        assert tokens[rid] == reference(model, prompt, 8)
        assert finish[rid] in ("length", "stop")


def test_invalid_request_gets_an_error_output(worker: WorkerHandle) -> None:
    transport.send(worker.sock, AddRequest("bad", [10**7], SamplingParams()))
    tokens, finish = read_until(worker.sock, {"bad"})
    assert finish == {"bad": "error"} and tokens == {"bad": []}


def test_bad_registry_entry_fails_the_start(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "ghost", "source": str(tmp_path / "missing")}]}))
    with pytest.raises(WorkerStartError, match="ghost"):
        start_worker(path, "ghost", start_timeout=60)


def test_idle_worker_beats_without_using_cpu(worker: WorkerHandle) -> None:
    """Heartbeats come on their own; an idle worker (as a deadlocked one) shows next to no CPU in them."""
    transport.send(worker.sock, AddRequest("warm", [5, 6, 7], SamplingParams(max_tokens=2)))
    read_until(worker.sock, {"warm"})
    worker.sock.settimeout(10)
    beats: list[Heartbeat] = []
    while len(beats) < 8:
        message = transport.recv(worker.sock, transport.from_worker_decoder)
        assert isinstance(message, Heartbeat), message
        beats.append(message)
    assert all(b.step == beats[0].step > 0 and b.step_seconds == 0.0 for b in beats)
    gaps = [b.monotonic - a.monotonic for a, b in itertools.pairwise(beats)]
    assert all(0.1 < gap < 2.0 for gap in gaps), gaps
    # the first beats may still see the last step's threads wind down; the later ones are idle
    later = beats[3:]
    share = (later[-1].cpu_seconds - later[0].cpu_seconds) / (later[-1].monotonic - later[0].monotonic)
    assert 0 <= share < MIN_CPU_SHARE / 2, share


def test_the_worker_logs_at_the_api_process_level(registry: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """At the API process's DEBUG the worker logs each step's rows, time and prices; at INFO it does not."""
    root = logging.getLogger()
    before = root.level
    for level, wanted in ((logging.DEBUG, True), (logging.INFO, False)):
        root.setLevel(level)
        try:
            handle = start_worker(registry, "tiny", start_timeout=120)
        finally:
            root.setLevel(before)
        transport.send(handle.sock, AddRequest("logged", [5, 6, 7], SamplingParams(max_tokens=3)))
        read_until(handle.sock, {"logged"})
        assert handle.close() == 0
        stepped = "DEBUG step 1: 0 streams + 3 prompt tokens" in capfd.readouterr().err
        assert stepped is wanted, level

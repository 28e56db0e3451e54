"""A registry of several models served at once: aliases, a merged LoRA, a lazy model that loads on its first request
and unloads after its keep_alive, and /v1/models reporting each one's state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server_harness import Server, start_server, worker_pids, write_registry

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("registry")
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp / "adapter")
    common = {"source": str(tiny_llama_dir), "dtype": "float32", "kv_cache_memory": "8MiB"}
    entries: list[dict[str, Any]] = [
        {"name": "tiny", "aliases": ["tiny-alias"], **common},
        {"name": "tiny-lora", "lora": {"adapter": str(tmp / "adapter")}, **common},
        {"name": "tiny-lazy", "load": "lazy", "keep_alive": "3s", **common},
    ]
    server = start_server(write_registry(tmp / "models.yaml", entries), tmp, "--cache-dir", str(tmp / "cache"))
    yield server
    assert server.stop() == 0


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(
        "/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0}
    )


def cards(client: httpx.Client) -> dict[str, dict[str, object]]:
    return {card["id"]: card for card in client.get("/v1/models").json()["data"]}


def test_models_list_every_model_and_alias(server: Server) -> None:
    with server.client() as client:
        listed = cards(client)
    assert set(listed) == {"tiny", "tiny-alias", "tiny-lora", "tiny-lazy"}
    assert listed["tiny-alias"]["root"] == "tiny" and listed["tiny"]["state"] == "loaded"
    assert listed["tiny-lora"]["lora"] and listed["tiny"]["quantization"] == "none"
    assert listed["tiny-lazy"]["state"] == "unloaded"


def test_alias_answers_as_its_model(server: Server) -> None:
    with server.client() as client:
        by_name, by_alias = complete(client, "tiny").json(), complete(client, "tiny-alias").json()
    assert by_alias["choices"][0]["text"] == by_name["choices"][0]["text"] and by_alias["model"] == "tiny"


def test_lora_model_answers_differently(server: Server) -> None:
    with server.client() as client:
        base, merged = complete(client, "tiny"), complete(client, "tiny-lora")
    assert base.status_code == merged.status_code == 200
    assert merged.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    assert "LoRA merged" in server.log()


def test_lazy_model_loads_on_first_request_and_unloads_when_idle(server: Server) -> None:
    assert "tiny-lazy" not in worker_pids(server)
    with server.client() as client:
        assert client.get("/ready").status_code == 200  # an unloaded lazy model does not make the server unready
        first = complete(client, "tiny-lazy")
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 6
        assert "tiny-lazy" in worker_pids(server) and cards(client)["tiny-lazy"]["state"] == "loaded"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "tiny-lazy" in worker_pids(server):
            time.sleep(0.2)
        assert "tiny-lazy" not in worker_pids(server), "the idle lazy model's worker should have exited"
        assert cards(client)["tiny-lazy"]["state"] == "unloaded"
        again = complete(client, "tiny-lazy")
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]

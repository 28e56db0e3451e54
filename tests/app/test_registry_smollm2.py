"""The registry's four kinds of entry served at once from the real default model: full precision, int8, nf4, and a
merged LoRA adapter. Each answers through the official OpenAI client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server_harness import Server, start_server, write_registry

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("four")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, config)
    with torch.no_grad():  # a small, non-zero B: the adapter shifts the model without wrecking it
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    lora.save_pretrained(tmp / "adapter")
    common: dict[str, Any] = {"source": str(smollm2_dir), "dtype": "float32", "kv_cache_memory": "64MiB"}
    entries = [
        {"name": "smollm2", **common},
        {"name": "smollm2-int8", "quantization": "int8", **common},
        {"name": "smollm2-nf4", "quantization": "nf4", **common},
        {"name": "smollm2-lora", "lora": {"adapter": str(tmp / "adapter")}, **common},
    ]
    server = start_server(write_registry(tmp / "models.yaml", entries), tmp, "--cache-dir", str(tmp / "cache"))
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("model", ["smollm2", "smollm2-int8", "smollm2-nf4", "smollm2-lora"])
def test_each_entry_answers(server: Server, model: str) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.model == model
    if model != "smollm2-lora":
        assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_models_report_their_kind(server: Server) -> None:
    with server.client() as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["smollm2-int8"]["quantization"] == "int8" and cards["smollm2-nf4"]["quantization"] == "nf4"
    assert str(cards["smollm2-lora"]["lora"]).endswith("adapter")
    assert all(card["state"] == "loaded" for card in cards.values())

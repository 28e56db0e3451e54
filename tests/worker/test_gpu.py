"""The engine on a CUDA device against transformers' `generate` on the same device, greedy, token for token. Run on
a GPU machine with `pytest -m gpu`; skipped where there is no CUDA device (CI)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import make_engine, random_prompts, reference, run_all
from worker.messages import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_tokens=14, temperature=0.0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cast(torch.nn.Module, model).to("cuda")  # in place; transformers types its `to` as a model-level wrapper
    return model.eval()


def references(model: PreTrainedModel, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    return {rid: reference(model, prompt, GREEDY.max_tokens) for rid, prompt in prompts.items()}


def test_concurrent_greedy_equals_generate_on_cuda(model: PreTrainedModel) -> None:
    prompts = random_prompts(int(model.config.vocab_size), [1, 3, 7, 12, 16, 23, 31, 45])
    engine = make_engine(model)
    assert engine.device.type == "cuda"
    assert run_all(engine, prompts, GREEDY).tokens == references(model, prompts)


def test_chunked_prefill_and_prefix_hits_equal_generate_on_cuda(model: PreTrainedModel) -> None:
    vocab = int(model.config.vocab_size)
    shared = random_prompts(vocab, [40], seed=5)["r0"]
    prompts = random_prompts(vocab, [5, 17, 30], seed=6, prefix=shared)
    engine = make_engine(model, max_num_batched_tokens=24)
    first = run_all(engine, {"warm": shared}, GREEDY)
    assert first.tokens["warm"] == reference(model, shared, GREEDY.max_tokens)
    assert run_all(engine, prompts, GREEDY).tokens == references(model, prompts)
    assert engine.stats().prefix_cache_hits > 0, "the shared 40 tokens should have come from the cache"

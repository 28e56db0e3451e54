"""The engine on a CUDA device against transformers' `generate` on the same device, greedy: float32 token for token,
bfloat16 and bitsandbytes int8 / nf4 up to a near-tie, and no memory growth over 1,000 requests. Run on a GPU machine
with `pytest -m gpu`; skipped where there is no CUDA device (CI).

Each test body takes a model or a device and nothing else, so its logic can be tried on CPU while it is written.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.conftest import tiny_entry
from tests.worker.engine_harness import (
    Reference,
    assert_near_ties_only,
    drain,
    make_engine,
    random_prompts,
    reference,
    reference_with_logprobs,
    run_all,
)
from worker.engine import Engine
from worker.flash_attention import PAGE_MULTIPLE
from worker.loader import load_model
from worker.messages import SamplingParams
from worker.model_runner import flash_backend_fits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_tokens=14, temperature=0.0)
CUDA = torch.device("cuda")
# Bytes that `memory_allocated` may gain between a warm-up wave and the end of 1,000 requests. The CUDA caching
# allocator rounds every tensor up to 512 bytes, so even one leaked tensor a request would add about 475 KiB.
MEMORY_SLACK = 128 << 10


def load_tiny(path: Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    cast(torch.nn.Module, model).to(device)  # in place; transformers types its `to` as a model-level wrapper
    return model.eval()


def logprob_references(model: PreTrainedModel, prompts: dict[str, list[int]]) -> dict[str, Reference]:
    return {rid: reference_with_logprobs(model, prompt, GREEDY.max_tokens) for rid, prompt in prompts.items()}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return load_tiny(request.getfixturevalue(f"tiny_{request.param}_dir"), torch.float32, CUDA)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bf16_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return load_tiny(request.getfixturevalue(f"tiny_{request.param}_dir"), torch.bfloat16, CUDA)


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


def check_bf16_concurrent(model: PreTrainedModel) -> None:
    prompts = random_prompts(int(model.config.vocab_size), [1, 3, 7, 12, 16, 23, 31, 45, 64, 90], seed=1)
    engine = make_engine(model)
    assert engine.runner.dtype == torch.bfloat16
    assert_near_ties_only(run_all(engine, prompts, GREEDY).tokens, logprob_references(model, prompts))


def check_bf16_chunked_prefill(model: PreTrainedModel) -> None:
    vocab = int(model.config.vocab_size)
    shared = random_prompts(vocab, [40], seed=7)["r0"]
    prompts = {"warm": shared} | random_prompts(vocab, [2, 9, 26, 57], seed=8, prefix=shared)
    engine = make_engine(model, max_num_batched_tokens=16)
    first = run_all(engine, {"warm": prompts["warm"]}, GREEDY).tokens
    rest = run_all(engine, {rid: p for rid, p in prompts.items() if rid != "warm"}, GREEDY).tokens
    assert_near_ties_only(first | rest, logprob_references(model, prompts))
    assert engine.stats().prefix_cache_hits > 0, "the shared 40 tokens should have come from the cache"


def test_bf16_concurrent_greedy_matches_generate_up_to_near_ties(bf16_model: PreTrainedModel) -> None:
    check_bf16_concurrent(bf16_model)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not flash_backend_fits(CUDA, torch.bfloat16, PAGE_MULTIPLE),
    reason="needs flash-attn, or torch 2.12+, for paged flash attention",
)
def test_bf16_over_flash_attention_pages_matches_generate_up_to_near_ties(bf16_model: PreTrainedModel) -> None:
    """The flash path an engine takes on CUDA by default: pages of 256 tokens, contexts across pages, chunked
    prefill, decodes replayed in graphs."""
    prompts = random_prompts(int(bf16_model.config.vocab_size), [1, 7, 45, 250, 300, 400], seed=2)
    engine = make_engine(bf16_model, num_blocks=16, block_size=PAGE_MULTIPLE, max_num_batched_tokens=256)
    assert engine.runner.flash and engine.runner.graphs is not None
    assert_near_ties_only(run_all(engine, prompts, GREEDY).tokens, logprob_references(bf16_model, prompts))
    assert engine.runner.graphs.replays > 0


def test_bf16_chunked_prefill_matches_generate_up_to_near_ties(bf16_model: PreTrainedModel) -> None:
    check_bf16_chunked_prefill(bf16_model)


def check_quantized(model_dir: Path, quantization: str, device: str, cache_dir: Path) -> None:
    """Loaded through the registry and the loader like a served model; greedy equals the same model's `generate`."""
    from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt

    entry = tiny_entry(
        model_dir,
        name=f"tiny-{quantization}",
        quantization=quantization,
        dtype="bfloat16",
        device=device,
        kv_cache_memory=1 << 22,
        block_size=4,
        max_num_batched_tokens=16,
    )
    loaded = load_model(entry, cache_dir)
    assert loaded.device.type == torch.device(device).type
    layer = Linear8bitLt if quantization == "int8" else Linear4bit
    quantized = [m for m in loaded.model.modules() if isinstance(m, layer)]
    assert len(quantized) == 7 * int(loaded.config.num_hidden_layers), f"{quantization} layers: {len(quantized)}"
    assert all(m.weight.device.type == loaded.device.type for m in quantized)
    assert all(m.weight.dtype == (torch.int8 if quantization == "int8" else torch.uint8) for m in quantized)

    prompts = random_prompts(int(loaded.config.vocab_size), [1, 4, 9, 17, 30, 44], seed=9)
    refs = logprob_references(loaded.model, prompts)  # before the engine: it gives the model its own attention
    engine = Engine.from_loaded(loaded, entry)
    assert engine.runner.lean is None, "quantized layers must keep transformers' forward"
    run = run_all(engine, prompts, GREEDY)
    assert_near_ties_only(run.tokens, refs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_through_registry_matches_generate_up_to_near_ties(
    tiny_llama_dir: Path, tmp_path: Path, quantization: str
) -> None:
    pytest.importorskip("bitsandbytes")
    check_quantized(tiny_llama_dir, quantization, "cuda", tmp_path)


def device_memory(device: torch.device) -> int:
    """Bytes held by live tensors on `device`: the CUDA allocator's count, or on the CPU what the garbage collector
    finds (tensors only Python holds; oneDNN-packed weights have no storage to count, and never change anyway)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance asks some lazy module objects for __class__, which warns
        tensor = obj if issubclass(type(obj), torch.Tensor) else None
        if tensor is not None and tensor.device == device and tensor.layout == torch.strided and not tensor.is_mkldnn:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def check_no_memory_growth(model: PreTrainedModel, requests: int = 1000, wave: int = 50) -> None:
    """Waves of short requests of mixed lengths, half of them sharing a prefix (so prefix hits and evictions run)."""
    engine = make_engine(model, num_blocks=1024, block_size=4)
    vocab = int(model.config.vocab_size)
    shared = random_prompts(vocab, [12], seed=10)["r0"]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def run_wave(index: int) -> None:
        lengths = [1 + (7 * i) % 40 for i in range(wave)]
        fresh = random_prompts(vocab, lengths, seed=100 + index)
        for i, (rid, prompt) in enumerate(fresh.items()):
            engine.add_request(f"w{index}-{rid}", (shared if i % 2 else []) + prompt, params)
        run = drain(engine)
        assert len(run.finish) == wave and set(run.finish.values()) == {"length"}
        assert all(len(tokens) == params.max_tokens for tokens in run.tokens.values())

    run_wave(0)
    warm = device_memory(engine.device)
    for index in range(1, requests // wave):
        run_wave(index)
    grown = device_memory(engine.device) - warm
    assert not engine.requests and not engine.has_work()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.stats().prefix_cache_hits > 0
    assert grown <= MEMORY_SLACK, f"{grown} bytes more after {requests} requests than after the first {wave}"


def test_no_memory_growth_over_1000_requests_on_cuda(tiny_llama_dir: Path) -> None:
    check_no_memory_growth(load_tiny(tiny_llama_dir, torch.bfloat16, CUDA))

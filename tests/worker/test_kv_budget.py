"""The KV budget: the profiling step is the largest the scheduler can build and runs through the real runner and
sampler; on CUDA the pool it sizes leaves room for that step under the requested share of the device."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import make_engine, random_prompts, run_all
from worker import kv_budget
from worker.kv_budget import COSTLIEST_SAMPLING, following_decodes, profile_items
from worker.messages import SamplingParams
from worker.model_runner import ModelRunner, kv_bytes_per_token
from worker.sampler import SampleInput, Sampler


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_the_budget_is_the_share_less_what_is_in_use_and_the_step() -> None:
    gib = 2**30
    assert kv_budget.kv_budget(80 * gib, 0.9, 20 * gib, 2 * gib) == 50 * gib
    assert kv_budget.kv_budget(80 * gib, 0.5, 39 * gib, 2 * gib) < 0  # no room: the caller refuses to start


def test_the_cpu_default_follows_bytes_per_token_and_memory() -> None:
    gib, mib = 2**30, 2**20
    plenty = 64 * gib
    # room for max_num_seqs requests of 1,024 tokens, whatever a token costs, while memory and the cap allow
    assert kv_budget.default_cpu_kv_cache_memory(23 * 1024, 64, 8192, plenty) == 23 * 1024 * 64 * 1024
    assert kv_budget.default_cpu_kv_cache_memory(2 * 23 * 1024, 64, 8192, plenty) == 2 * 23 * 1024 * 64 * 1024
    # a 1B model in float32 (64 KiB a token): the 4 GiB cap, 65,536 tokens, where 256 MiB held 4,096
    one_b = kv_budget.default_cpu_kv_cache_memory(64 * 1024, 64, 131072, plenty)
    assert one_b == 4 * gib and one_b // (64 * 1024) == 65536
    # a quarter of what memory is left bounds it
    assert kv_budget.default_cpu_kv_cache_memory(64 * 1024, 64, 131072, 2 * gib) == 512 * mib
    # a short context needs no more than max_num_seqs full requests; one full request at least
    assert kv_budget.default_cpu_kv_cache_memory(1000, 8, 512, plenty) == 1000 * 8 * 512
    assert kv_budget.default_cpu_kv_cache_memory(1000, 1, 8192, plenty) == 1000 * 8192


def test_available_memory_is_measured_and_within_the_machine() -> None:
    import psutil

    assert 0 < kv_budget.available_memory() <= psutil.virtual_memory().total


@pytest.mark.parametrize(("tokens", "seqs"), [(2048, 64), (100, 7), (5, 64), (16, 1)])
def test_the_profiling_step_is_the_largest_the_scheduler_builds(tokens: int, seqs: int) -> None:
    items = profile_items(tokens, seqs, block_size=16)
    assert sum(len(item.token_ids) for item in items) == tokens
    assert len(items) == min(tokens, seqs)
    lengths = [len(item.token_ids) for item in items]
    assert max(lengths) - min(lengths) <= 1
    blocks = [block for item in items for block in item.block_table]
    assert sorted(blocks) == list(range(len(blocks))), "each request in blocks of its own"
    for item in items:
        assert item.num_computed == 0 and item.sample
        assert len(item.block_table) == -(-len(item.token_ids) // 16)
    decodes = following_decodes(items, 16)
    assert all(d.num_computed == len(p.token_ids) for d, p in zip(decodes, items, strict=False))
    assert all(d.num_computed < len(d.block_table) * 16 for d in decodes)


def test_the_profiling_steps_run_through_the_runner_and_the_sampler(model: PreTrainedModel) -> None:
    """What the profile measures on CUDA runs here too: the largest prefill and its decodes, sampled costliest."""
    prefills = profile_items(200, 9, block_size=4)
    runner = ModelRunner(copy.deepcopy(model), kv_budget.blocks_needed(prefills), 4, torch.device("cpu"))
    sampler = Sampler(0)
    for items in (prefills, following_decodes(prefills, 4)):
        logits = runner.execute(items)
        assert logits.shape == (len(items), model.config.vocab_size)
        rows = [SampleInput(str(i), COSTLIEST_SAMPLING, it.token_ids, [], []) for i, it in enumerate(items)]
        out = sampler.sample(logits, rows)
        assert len(out.token_ids) == len(items) and all(lp is not None for lp in out.logprobs)


def test_an_engine_sizes_its_pool_by_profiling_only_on_cuda(model: PreTrainedModel) -> None:
    with pytest.raises(ValueError, match="CUDA only"):
        make_engine(model, num_blocks=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_profiled_pool_leaves_room_for_the_largest_step(model: PreTrainedModel) -> None:
    on_device = cast(PreTrainedModel, copy.deepcopy(model).to("cuda"))  # type: ignore[arg-type]
    utilization = 0.3
    engine = make_engine(
        on_device, num_blocks=None, gpu_memory_utilization=utilization, max_num_seqs=32, max_num_batched_tokens=512
    )
    per_block = kv_bytes_per_token(on_device, engine.runner.dtype) * engine.block_manager.block_size
    pool = (engine.block_manager.num_blocks + 1) * per_block
    _, total = torch.cuda.mem_get_info()
    assert pool > 0.1 * total, "most of the share should go to the KV pool of a tiny model"
    torch.cuda.reset_peak_memory_stats()
    vocab = int(on_device.config.vocab_size)
    prompts = random_prompts(vocab, [16] * 32, seed=3)  # 512 prompt tokens: the largest step, then 32 decodes
    run_all(engine, prompts, SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, logprobs=5))
    assert torch.cuda.max_memory_reserved() <= utilization * total

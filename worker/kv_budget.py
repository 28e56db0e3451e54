"""How much memory the KV cache gets, when the registry entry does not say (`kv_cache_memory`).

On the CPU: room for `max_num_seqs` requests of 1,024 tokens (and for one of `max_model_len`), in the model's own
bytes per token, within a quarter of the memory available once the weights are loaded (the container's limit, where
there is one) and at most 4 GiB, vLLM's default KV space on a CPU. A 135M model gets 1.5 GiB this way, a 1B one in
float32 (64 KiB a token) 4 GiB, 65k tokens, where a fixed 256 MiB held 4,096 and 32 streams preempted constantly.
The pool's pages are committed only as blocks fill.

On CUDA: the entry's `gpu_memory_utilization` share of the device's memory, less what is in use once the weights are
loaded (the weights, the CUDA context, other processes on the device), less the most a step adds on top. That peak is
measured, not guessed: a profiling forward runs the largest step the scheduler can build (`max_num_batched_tokens`
prompt tokens spread over `max_num_seqs` requests, every one sampled with the costliest sampler settings), then the
largest decode step, whose activations the decode graphs keep for good. A pool sized so leaves every step room, and
the server does not run out of memory under load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import torch

from worker.messages import SamplingParams
from worker.model_runner import BatchItem, ModelRunner
from worker.sampler import SampleInput, Sampler

log = logging.getLogger("tokenmill.kv_budget")

CPU_KV_DEFAULT_CAP = 4 << 30
CPU_KV_DEFAULT_SHARE = 0.25
CPU_KV_TOKENS_PER_SEQ = 1024
CGROUP = Path("/sys/fs/cgroup")
# Every sampler stage that allocates a [rows, vocab] tensor: penalties, temperature, top-k, top-p, min-p, logprobs.
COSTLIEST_SAMPLING = SamplingParams(
    temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.5, logprobs=20
)


def available_memory() -> int:
    """Bytes this process may still take: the machine's available memory, or less where a cgroup (v2) limit is."""
    available = int(psutil.virtual_memory().available)
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def default_cpu_kv_cache_memory(
    bytes_per_token: int, max_num_seqs: int, max_model_len: int, available: int | None = None
) -> int:
    """The CPU KV budget where the entry sets none (see the module's docstring); `available`: measured if None."""
    room = (available_memory() if available is None else available) * CPU_KV_DEFAULT_SHARE
    wanted = bytes_per_token * max(max_model_len, max_num_seqs * min(max_model_len, CPU_KV_TOKENS_PER_SEQ))
    return int(min(wanted, room, CPU_KV_DEFAULT_CAP))


def kv_budget(total: int, utilization: float, in_use: int, step_peak: int) -> int:
    """Bytes for the KV pool: `utilization` of the device's `total`, less what is `in_use` before the pool exists,
    less the `step_peak` a step adds on top of the pool."""
    return int(total * utilization) - in_use - step_peak


def profile_items(max_tokens: int, max_seqs: int, block_size: int) -> list[BatchItem]:
    """The largest step: `max_tokens` fresh prompt tokens over min(max_seqs, max_tokens) requests, each in its own
    blocks (0, 1, ...), each sampled."""
    seqs = max(1, min(max_seqs, max_tokens))
    base, extra = divmod(max_tokens, seqs)
    items = []
    next_block = 0
    for index in range(seqs):
        length = base + (index < extra)
        blocks = -(-length // block_size)
        tokens = [(index + position) % 1000 + 1 for position in range(length)]
        items.append(BatchItem(tokens, 0, list(range(next_block, next_block + blocks)), True))
        next_block += blocks
    return items


def following_decodes(prefills: list[BatchItem], block_size: int) -> list[BatchItem]:
    """One decode for each of `prefills` after it ran; a decode that would need a block the table lacks is left out."""
    return [
        BatchItem([1], len(item.token_ids), item.block_table, True)
        for item in prefills
        if len(item.token_ids) < len(item.block_table) * block_size
    ]


def blocks_needed(items: list[BatchItem]) -> int:
    return max(block for item in items for block in item.block_table) + 1


def step_peak(runner: ModelRunner, sampler: Sampler, items: list[BatchItem]) -> int:
    """Bytes a step of `items` (forward and sampling) allocates on CUDA above what was allocated before it."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    logits = runner.execute(items)
    rows = [SampleInput(f"profile-{i}", COSTLIEST_SAMPLING, item.token_ids, [], []) for i, item in enumerate(items)]
    sampler.sample(logits, rows)
    for row in rows:
        sampler.release(row.request_id)
    del logits
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def profile_num_blocks(
    runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int, utilization: float, bytes_per_block: int
) -> int:
    """Size the runner's KV pool on CUDA from a profiling forward (see the module's docstring); allocates it and
    returns its number of blocks. The runner's current pool is replaced."""
    device = runner.device
    prefills = profile_items(max_num_batched_tokens, max_num_seqs, runner.block_size)
    runner.allocate(blocks_needed(prefills))
    sampler = Sampler(0)
    peak = step_peak(runner, sampler, prefills)
    decodes = following_decodes(prefills, runner.block_size)
    decode_peak = step_peak(runner, sampler, decodes) if decodes else 0
    runner.allocate(0)  # the profiling pool goes before the measure of what is in use
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = kv_budget(total, utilization, in_use, peak + decode_peak)
    num_blocks = budget // bytes_per_block
    gib = 2**30
    log.info(
        "KV budget on %s: %.0f%% of %.1f GiB, less %.2f GiB in use and %.2f + %.2f GiB peak of the largest step "
        "and decode step: %.2f GiB",
        device,
        utilization * 100,
        total / gib,
        in_use / gib,
        peak / gib,
        decode_peak / gib,
        budget / gib,
    )
    if num_blocks < blocks_needed(prefills):
        raise MemoryError(
            f"{device} has room for {max(num_blocks, 0)} KV blocks after the weights and the largest step, fewer than "
            f"one full step needs ({blocks_needed(prefills)}); raise gpu_memory_utilization, or lower "
            "max_num_batched_tokens or max_num_seqs"
        )
    runner.allocate(num_blocks)
    return num_blocks

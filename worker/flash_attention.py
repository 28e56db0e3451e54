"""FlashAttention 2 over the paged KV cache, on CUDA: the `flash_attn` package's kernels where it is installed, else
torch's own varlen attention where it takes a paged cache (`torch.nn.attention.varlen`, torch 2.12 and later).

The glue between our packed batches and the two paged kernels: the cache layout they read, the metadata they take,
the in-place store of new K/V, and which kernel serves a step. Kernels are imported lazily.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from packaging.version import InvalidVersion, Version

from worker.transfers import lists_to_device

# flash_attn_with_kvcache took a block_table from 2.5.0, flash_attn_varlen_func from 2.5.7 (flash-attention PR #831).
MIN_VERSION = Version("2.5.7")
# Upstream kernels refuse a paged cache whose block size is not a multiple of this.
PAGE_MULTIPLE = 256


class VarlenKernel(Protocol):
    """flash_attn_varlen_func: q [T, H, D] over a paged k/v; causal is aligned to the bottom right -> [T, H, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        *,
        softmax_scale: float,
        causal: bool,
        block_table: torch.Tensor,
    ) -> torch.Tensor: ...


class KVCacheKernel(Protocol):
    """flash_attn_with_kvcache: q [B, S, H, D] over the first cache_seqlens[b] cached tokens -> [B, S, H, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor,
        softmax_scale: float,
        causal: bool,
    ) -> torch.Tensor: ...


class Kernels(NamedTuple):
    varlen: VarlenKernel
    with_kvcache: KVCacheKernel


class Span(NamedTuple):
    """One request's share of a step: q_len new tokens; ctx_len tokens cached once they are stored (them included)."""

    q_len: int
    ctx_len: int
    block_table: Sequence[int]


@dataclass
class FlashMetadata:
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: request b's query rows are [cu_q[b], cu_q[b + 1])
    cu_seqlens_k: torch.Tensor  # [B + 1] int32: differences are the context lengths
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    seq_lens_k: torch.Tensor  # [B] int32: context lengths, as flash_attn_with_kvcache's cache_seqlens
    decode_only: bool  # every request feeds one token: the fixed-shape kernel serves the step


def available() -> bool:
    """flash_attn and its compiled kernels are installed, in a version with paged varlen attention. Imports nothing."""
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn_2_cuda") is None:
        return False
    try:
        return Version(importlib.metadata.version("flash_attn")) >= MIN_VERSION
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return False


def installed_version() -> str:
    try:
        return importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def torch_paged_available() -> bool:
    """torch's varlen attention takes a paged cache (a block_table: torch 2.12 and later); it runs on CUDA only."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "block_table" in inspect.signature(varlen_attn).parameters


def kernel_source() -> str | None:
    """Who provides the kernels here: flash-attn where installed, else torch where its varlen attention pages."""
    if available():
        return f"flash-attn {installed_version()}"
    if torch_paged_available():
        return f"torch {torch.__version__} varlen_attn"
    return None


@functools.cache
def flash_kernels() -> Kernels:
    """The two kernels: flash_attn's, else torch's (see `kernel_source`), imported on first use."""
    if available():
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        return Kernels(flash_attn_varlen_func, flash_attn_with_kvcache)
    if torch_paged_available():
        return torch_kernels()
    raise RuntimeError(
        f"the flash-attn backend needs flash-attn>={MIN_VERSION} with its CUDA kernels, or torch 2.12 or later"
    )


def torch_kernels() -> Kernels:
    """flash-attn's two kernels' contract served by `torch.nn.attention.varlen.varlen_attn` over the same paged
    cache: causal is its window (-1, 0), aligned to the bottom right like flash-attn's; it takes the context lengths
    as `seqused_k`, which a decode computes on the device from its own inputs (no host sync, graph-safe)."""
    from torch.nn.attention import varlen

    # it logs which backend it takes at INFO on every call: every layer of every step, in a worker that logs INFO
    logging.getLogger(varlen.__name__).setLevel(logging.WARNING)

    def torch_varlen(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        *,
        softmax_scale: float,
        causal: bool,
        block_table: torch.Tensor,
    ) -> torch.Tensor:
        out = varlen.varlen_attn(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale=softmax_scale,
            window_size=(-1, 0) if causal else (-1, -1),
            enable_gqa=True,
            seqused_k=cu_seqlens_k[1:] - cu_seqlens_k[:-1],
            block_table=block_table,
        )
        assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
        return out

    def torch_with_kvcache(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor,
        softmax_scale: float,
        causal: bool,
    ) -> torch.Tensor:
        batch, rows = q.shape[0], q.shape[1]
        cu_q = torch.arange(0, (batch + 1) * rows, rows, dtype=torch.int32, device=q.device)
        widest = block_table.shape[1] * k_cache.shape[1]  # a bound fixed by the shapes: the same in every replay
        out = torch_varlen(
            q.flatten(0, 1),
            k_cache,
            v_cache,
            cu_q,
            offsets(cache_seqlens),
            rows,
            widest,
            softmax_scale=softmax_scale,
            causal=causal,
            block_table=block_table,
        )
        return out.view(q.shape)

    return Kernels(torch_varlen, torch_with_kvcache)


def offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Lengths [B] -> int32 offsets [B + 1] (0 first), on their device: no host sync, so a graph can hold it."""
    zero = torch.zeros(1, dtype=torch.int32, device=lengths.device)
    return torch.cat([zero, lengths.cumsum(0, dtype=torch.int32)])


def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """One layer's K (or V) cache as flash-attn pages it: block, offset in the block, KV head, head dim."""
    return (num_blocks, block_size, kv_heads, head_dim)


def build_metadata(
    spans: Sequence[Span | tuple[int, int, Sequence[int]]],
    block_size: int,
    device: torch.device | str,
    max_blocks: int | None = None,
) -> FlashMetadata:
    """Metadata of one step from its requests in packed order. A fixed `max_blocks` keeps the block table's width
    the same from step to step, as a captured CUDA graph needs."""
    if not spans:
        raise ValueError("a step needs at least one request")
    cu_q, cu_k = [0], [0]
    tables: list[list[int]] = []
    for q_len, ctx_len, table in spans:
        needed = -(-ctx_len // block_size)
        if not 0 < q_len <= ctx_len:
            raise ValueError(f"a span feeds 1..ctx_len tokens; got q_len={q_len}, ctx_len={ctx_len}")
        if needed > len(table):
            raise ValueError(f"{ctx_len} tokens need {needed} blocks of {block_size}; the table has {len(table)}")
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + ctx_len)
        tables.append(list(table[:needed]))
    widest = max(len(t) for t in tables)
    width = widest if max_blocks is None else max_blocks
    if widest > width:
        raise ValueError(f"a request needs {widest} blocks, more than max_blocks={max_blocks}")
    batch = len(spans)
    lens = [cu_k[i + 1] - cu_k[i] for i in range(batch)]
    flat = [block for t in tables for block in t + [0] * (width - len(t))]
    cu_seqlens_q, cu_seqlens_k, seq_lens_k, table_flat = lists_to_device(
        [cu_q, cu_k, lens, flat], torch.int32, torch.device(device)
    )
    return FlashMetadata(
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max(cu_q[i + 1] - cu_q[i] for i in range(batch)),
        max_seqlen_k=max(lens),
        block_table=table_flat.view(batch, width),
        seq_lens_k=seq_lens_k,
        decode_only=cu_q[-1] == batch,
    )


def store(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new K/V [T, Hkv, D] into the caches in place; slot_mapping [T] long: block * block_size + offset."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    rows = num_blocks * block_size
    k_cache.view(rows, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(rows, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: FlashMetadata,
    scale: float,
    kernels: Kernels | None = None,
) -> torch.Tensor:
    """Causal attention of the packed queries q [T, H, D] over the stored contexts -> [T, H, D]. The step's own
    K/V must be stored first. flash-attn computes in fp16/bf16 only, with q in the caches' dtype."""
    if q.dtype != k_cache.dtype:
        raise ValueError(f"queries in {q.dtype} over a {k_cache.dtype} cache")
    if kernels is None:
        if k_cache.shape[1] % PAGE_MULTIPLE:
            raise ValueError(f"flash-attn pages blocks of a multiple of {PAGE_MULTIPLE}, not {k_cache.shape[1]}")
        kernels = flash_kernels()
    if meta.decode_only:
        out = kernels.with_kvcache(
            q.unsqueeze(1),  # a batch of one-token sequences
            k_cache,
            v_cache,
            cache_seqlens=meta.seq_lens_k,
            block_table=meta.block_table,
            softmax_scale=scale,
            causal=True,
        )
        return out.squeeze(1)
    return kernels.varlen(
        q,
        k_cache,
        v_cache,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        softmax_scale=scale,
        causal=True,
        block_table=meta.block_table,
    )

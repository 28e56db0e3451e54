"""Paged attention plugged into transformers' attention interface: the HF model runs, our function attends.

One forward takes a packed batch ([1, T] tokens of every scheduled request, no padding). Each layer writes its new
K/V into the paged cache, then attends. With flash-attn (CUDA, `worker.flash_attention`) its kernels serve the whole
step over their own cache layout. Otherwise prefill chunks attend one request at a time with SDPA, and decodes all
at once, with the C kernel of `worker.native` reading the cache in place where it runs, else with batched matmuls
over the gathered blocks (faster than SDPA with a mask for single query rows on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from worker import flash_attention, native
from worker.flash_attention import FlashMetadata, Kernels

ATTENTION_NAME = "tokenmill_paged"
META_KWARG = "tokenmill_meta"


@dataclass
class PrefillSpan:
    """A run of query tokens of one request: packed rows [start, start + q_len), its context ends with them."""

    start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor | None  # cache slots of the whole context; None when the span is the whole context
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, True = attend; None when the span is the whole context
    table: torch.Tensor | None = None  # the request's block ids [n] int64: set, the native kernel attends in place


@dataclass
class DecodeBatch:
    """Requests that feed one token each: their rows in the packed batch, their block tables and lengths."""

    rows: torch.Tensor  # [B] long
    block_tables: torch.Tensor  # [B, max_blocks] long (padded with block 0)
    lengths: torch.Tensor  # [B] long: cached tokens, the new one included
    additive_mask: torch.Tensor | None  # [1, B, 1, max_blocks * block_size] float, 0 or -inf; None: native kernel
    every_row: bool = False  # the step is all decodes, rows 0..B-1 in order


@dataclass
class AttentionMetadata:
    # per layer: [kv_heads, num_blocks, block_size, head_dim]; with flash-attn [num_blocks, block_size, kv_heads, D]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes (block_id * block_size + offset)
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode: DecodeBatch | None = None
    flash: FlashMetadata | None = None  # set: flash-attn serves the whole step (prefills and decode stay empty)
    flash_kernels: Kernels | None = None  # None: flash_attn's own


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    meta: AttentionMetadata = kwargs[META_KWARG]
    out = attend(query[0], key[0], value[0], module.layer_idx, meta, scaling)  # type: ignore[arg-type]
    return out.unsqueeze(0), None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    meta: AttentionMetadata,
    scaling: float | None,
    stored: bool = False,
) -> torch.Tensor:
    """Store one layer's new K/V in the paged cache (unless the caller has: `stored`) and attend.
    q [H, T, D], k and v [Hkv, T, D] -> [T, H, D]."""
    k_cache, v_cache = meta.kv_caches[layer]
    if meta.flash is not None:
        scale = scaling if scaling is not None else k_cache.shape[-1] ** -0.5
        if not stored:
            flash_attention.store(k_cache, v_cache, k.transpose(0, 1), v.transpose(0, 1), meta.slot_mapping)
        return flash_attention.attend(q.transpose(0, 1), k_cache, v_cache, meta.flash, scale, meta.flash_kernels)
    kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    scale = scaling if scaling is not None else head_dim**-0.5
    flat_k = k_cache.view(kv_heads, num_blocks * block_size, head_dim)
    flat_v = v_cache.view(kv_heads, num_blocks * block_size, head_dim)
    if not stored:
        flat_k.index_copy_(1, meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(1, meta.slot_mapping, v.to(v_cache.dtype))

    if meta.decode is not None and meta.decode.every_row:
        return _decode_attention(q.transpose(0, 1), k_cache, v_cache, meta.decode, scale)
    out = torch.empty(q.shape[1], q.shape[0], head_dim, dtype=q.dtype, device=q.device)  # [T, H, D]
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.q_len)
        if span.table is not None:
            if not native.prefill_attention(q[:, rows], k_cache, v_cache, span.table, span.ctx_len, out[rows], scale):
                raise RuntimeError("the native prefill kernel refused shapes it was chosen for")
            continue
        if span.ctx_slots is None:
            ks, vs = k[:, rows], v[:, rows]
        else:
            ks, vs = flat_k.index_select(1, span.ctx_slots), flat_v.index_select(1, span.ctx_slots)
        # 4-D inputs: with 3-D ones torch's CPU SDPA takes its math path, 3-5x slower than its flash kernel
        attn = F.scaled_dot_product_attention(
            q[None, :, rows],
            ks.to(q.dtype)[None],
            vs.to(q.dtype)[None],
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attn[0].transpose(0, 1)

    if meta.decode is not None:
        rows_q = q.transpose(0, 1).index_select(0, meta.decode.rows)  # [B, H, D]
        out[meta.decode.rows] = _decode_attention(rows_q, k_cache, v_cache, meta.decode, scale)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch, scale: float
) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]. The cache layout [Hkv, blocks, block_size, D] makes one gather give [Hkv, B, L, D]."""
    if decode.additive_mask is None:
        out = native.decode_attention(q, k_cache, v_cache, decode.block_tables, decode.lengths, scale)
        if out is None:
            raise RuntimeError("the native decode kernel refused shapes it was chosen for")
        return out
    batch, heads, head_dim = q.shape
    q = q.transpose(0, 1)  # [H, B, D]
    kv_heads, num_blocks, block_size, _ = k_cache.shape
    tables = decode.block_tables
    length = tables.shape[1] * block_size
    index = tables.flatten()
    keys = k_cache.view(kv_heads, num_blocks, -1).index_select(1, index).view(kv_heads, batch, length, head_dim)
    values = v_cache.view(kv_heads, num_blocks, -1).index_select(1, index).view(kv_heads, batch, length, head_dim)
    # query heads of one KV head stay together: [Hkv, B, G, D]
    grouped = q.reshape(kv_heads, heads // kv_heads, batch, head_dim).transpose(1, 2)
    scores = torch.matmul(grouped, keys.to(q.dtype).transpose(2, 3)).float() * scale + decode.additive_mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.to(q.dtype))  # [Hkv, B, G, D]
    return out.permute(1, 0, 2, 3).reshape(batch, heads, head_dim)


def register() -> str:
    """Make `ATTENTION_NAME` a valid `attn_implementation`; no mask function is registered, so HF builds no mask."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME

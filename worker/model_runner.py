"""`ModelRunner`: owns the model and the KV tensors, turns a scheduled batch into one packed forward, returns logits.

The scheduler decides (pure Python); this module executes: it builds the packed input ids, position ids, cache
slots and attention metadata for one step, and keeps only the logits of requests that sample this step.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from worker import attention, llama_forward, native
from worker.attention import AttentionMetadata, DecodeBatch, PrefillSpan
from worker.gguf_weights import QuantizedRows


@dataclass
class BatchItem:
    """One request's share of a step: the tokens fed now and where its context lives."""

    token_ids: list[int]  # tokens fed this step (positions num_computed .. num_computed + len - 1)
    num_computed: int  # tokens already in the cache before this step
    block_table: list[int]
    sample: bool  # keep this request's last logits


def kv_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = _kv_shape(model)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


# Prefill spans of at most this many tokens attend through the decode kernel, row by row (each row's K/V is in the
# cache before attention runs, so a row at position p is a decode of length p + 1): SDPA costs about 170 us a call
# in dispatch alone, and a burst of 32 short prompts spent 40% of its prefill step there. Longer spans keep SDPA,
# whose matrix products win once a span attends to hundreds of keys per row.
SHORT_PREFILL = 64


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        gguf_blocks: dict[str, QuantizedRows] | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = next(model.parameters()).dtype
        layers, kv_heads, head_dim = _kv_shape(model)
        shape = (kv_heads, num_blocks, block_size, head_dim)
        # Zeroed, not empty: padded decode positions read cache slots that were never written, and NaN garbage
        # would survive a zero attention weight.
        pool = _zeroed_pool((layers, 2, *shape), self.dtype, device)
        self.kv_caches = [(pool[layer, 0], pool[layer, 1]) for layer in range(layers)]
        model.set_attn_implementation(attention.register())
        self.lean = llama_forward.LlamaForward(model, gguf_blocks) if llama_forward.supports(model) else None
        heads = model.config.get_text_config().num_attention_heads
        self.native_decode = native.decode_attention_takes(self.dtype, device, heads, kv_heads, head_dim)

    def describe(self) -> str:
        """The paths a step takes, for the start-up log: which forward, which projections, which attention."""
        if self.lean is None:
            forward = "transformers' modules"
        else:
            layer_ops = "native layer kernels" if self.lean.fused else "torch ops"
            forward = f"lean Llama forward ({layer_ops}; projections: {self.lean.projections()})"
        decode = "native kernel over the paged cache" if self.native_decode else "torch matmuls over gathered blocks"
        prefill = (
            f"SDPA (spans of at most {SHORT_PREFILL} tokens through the decode kernel)"
            if self.native_decode
            else "SDPA"
        )
        return f"{forward}; decode attention: {decode}; prefill attention: {prefill}; {self.dtype} on {self.device}"

    @torch.inference_mode()
    def execute(self, items: list[BatchItem]) -> torch.Tensor:
        """Run one packed forward; return float32 logits [num sampled items, vocab] in item order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_items: list[BatchItem] = []
        bs = self.block_size
        for item in items:
            start = len(input_ids)
            n = len(item.token_ids)
            input_ids.extend(item.token_ids)
            first = item.num_computed
            positions.extend(range(first, first + n))
            table = item.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(first, first + n))
            if item.sample:
                keep.append(start + n - 1)
            if n == 1 and first > 0:
                decode_rows.append(start)
                decode_items.append(item)
            elif self.native_decode and n <= SHORT_PREFILL:
                # each row of a short prefill attends as a decode would: the request's table, its own length
                decode_rows.extend(range(start, start + n))
                decode_items.extend(BatchItem([], first + i, table, False) for i in range(n))
            else:
                prefills.append(self._prefill_span(start, n, first, table))

        meta = AttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            prefills=prefills,
            decode=self._decode_batch(decode_rows, decode_items, len(input_ids)) if decode_items else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self.lean is not None:
            return self.lean(ids, pos, keep_t, meta).float()
        out = self.model(
            input_ids=ids[None],
            position_ids=pos[None],
            use_cache=False,
            logits_to_keep=keep_t,
            **{attention.META_KWARG: meta},
        )
        logits: torch.Tensor = out.logits[0]
        return logits.float()

    def _prefill_span(self, start: int, q_len: int, num_computed: int, table: list[int]) -> PrefillSpan:
        ctx_len = num_computed + q_len
        if num_computed == 0:
            return PrefillSpan(start, q_len, ctx_len, None, None)
        ctx_slots = self._slots(table, ctx_len)
        query_pos = torch.arange(num_computed, ctx_len, device=self.device)[:, None]
        key_pos = torch.arange(ctx_len, device=self.device)[None, :]
        return PrefillSpan(start, q_len, ctx_len, ctx_slots, key_pos <= query_pos)

    def _slots(self, table: list[int], length: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-length // self.block_size)], dtype=torch.long, device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets[None, :]).flatten()[:length]

    def _decode_batch(self, rows: list[int], items: list[BatchItem], num_rows: int) -> DecodeBatch:
        bs = self.block_size
        lengths = [item.num_computed + 1 for item in items]
        max_blocks = -(-max(lengths) // bs)
        tables = [
            item.block_table[:max_blocks] + [0] * (max_blocks - len(item.block_table[:max_blocks])) for item in items
        ]
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=self.device)
        mask = None
        if not self.native_decode:
            key_pos = torch.arange(max_blocks * bs, device=self.device)
            mask = torch.zeros(1, len(items), 1, max_blocks * bs, device=self.device)
            mask.masked_fill_((key_pos[None, :] >= lengths_t[:, None])[None, :, None, :], float("-inf"))
        return DecodeBatch(
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.long, device=self.device),
            lengths=lengths_t,
            additive_mask=mask,
            every_row=len(rows) == num_rows,  # rows are added in order, so then they are rows 0..T-1
        )


def _zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on the CPU an anonymous mapping, whose pages the kernel commits only once a block is written,
    so the process holds the KV memory it has used rather than all it may use."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for size in shape:
        numel *= size
    buffer = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size())
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)


def _kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim

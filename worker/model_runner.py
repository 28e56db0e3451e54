"""`ModelRunner`: owns the model and the KV tensors, turns a scheduled batch into one packed forward, returns logits.

The scheduler decides (pure Python); this module executes: it builds the packed input ids, position ids, cache
slots and attention metadata for one step, and keeps only the logits of requests that sample this step, and of the
prompt positions a request with prompt logprobs scores.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from worker import attention, flash_attention, llama_forward, native
from worker.attention import AttentionMetadata, DecodeBatch, PrefillSpan
from worker.cuda_graphs import DecodeGraphs, DecodeInputs, capture_sizes, table_widths
from worker.flash_attention import FlashMetadata, Kernels, Span
from worker.gguf_weights import QuantizedRows
from worker.transfers import lists_to_device


@dataclass
class BatchItem:
    """One request's share of a step: the tokens fed now and where its context lives."""

    token_ids: list[int]  # tokens fed this step (positions num_computed .. num_computed + len - 1)
    num_computed: int  # tokens already in the cache before this step
    block_table: list[int]
    sample: bool  # keep this request's last logits
    # offsets into token_ids whose logits are kept too, before the last row's: prompt positions being scored
    score_rows: range = range(0)


def kv_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = _kv_shape(model)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


# Prefill spans of at most this many tokens attend through the decode kernel, row by row (each row's K/V is in the
# cache before attention runs, so a row at position p is a decode of length p + 1): SDPA costs about 170 us a call
# in dispatch alone, and a burst of 32 short prompts spent 40% of its prefill step there. Longer spans keep SDPA,
# whose matrix products win once a span attends to hundreds of keys per row.
SHORT_PREFILL = 64
# Where the bf16 prefill kernel runs, it takes a span as soon as its work (query rows x keys) passes this, or it has
# more than 2 rows: the decode kernel reads the whole context once per row, the prefill kernel packs it once and
# shares each key between register tiles of rows. Measured a layer of SmolLM2 (9 heads, 3 KV heads), decode kernel
# against prefill kernel: 14 rows over 14 keys 14 against 23 us, 64 over 64 80 against 51, 16 over 256 130 against
# 61, 8 over 4,096 1,006 against 582, 4 over 4,096 501 against 419; one row over 4,096 the decode kernel is 3x faster.
# Through the decode kernel, the 16-token chunks of a 4,096-token prompt cost 3 ms a token and a step of 8 streams
# tripled.
SHORT_PREFILL_WORK = 2048
SHORT_PREFILL_ROWS = 2
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Decode graphs over attention that gathers whole block tables: the most K/V a captured step may gather per layer.
# Beyond it (many rows of long tables) the step runs eagerly over its own longest table, not the captured width.
GATHERED_BYTES_PER_LAYER = 256 << 20


def flash_backend_fits(device: torch.device, dtype: torch.dtype, block_size: int) -> bool:
    """Whether flash attention serves attention: on CUDA, with kernels here (flash-attn's or torch's), in fp16/bf16,
    over blocks they can page."""
    fits = device.type == "cuda" and dtype in FLASH_DTYPES and block_size % flash_attention.PAGE_MULTIPLE == 0
    return fits and flash_attention.kernel_source() is not None


def native_prefill_wins() -> bool:
    """Whether our C prefill attention beats torch's flash kernel here: on a CPU without AMX. With AMX tiles usable,
    torch's kernel (oneDNN on AMX) prefilled SmolLM2 in bfloat16 2.1-2.3x faster, whole or in chunks (2,048 tokens
    in one step: 463-496 against 1,028-1,059 ms; 4,096 in chunks of 512: 1.80-1.83 against 3.79-3.80 s; 2 threads,
    Intel Xeon with AMX); without, ours was 1.37x faster (AMD EPYC Zen 4). `native.gguf_amx` says whether the OS
    lets this process use AMX tiles, which oneDNN needs too."""
    return not native.gguf_amx()


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        gguf_blocks: dict[str, QuantizedRows] | None = None,
        flash: bool | None = None,
    ) -> None:
        """`flash`: attend with the flash kernels over their cache layout; None: where `flash_backend_fits`."""
        self.model = model
        self.device = device
        self.block_size = block_size
        self.dtype = next(model.parameters()).dtype
        self.flash = flash_backend_fits(device, self.dtype, block_size) if flash is None else flash
        self.flash_kernels: Kernels | None = None  # None: flash-attn's, else torch's; tests set others
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: DecodeGraphs | None = None
        self.allocate(num_blocks)
        model.set_attn_implementation(attention.register())
        self.lean = llama_forward.LlamaForward(model, gguf_blocks) if llama_forward.supports(model) else None
        _, kv_heads, head_dim = _kv_shape(model)
        heads = model.config.get_text_config().num_attention_heads
        self.native_decode = not self.flash and native.decode_attention_takes(
            self.dtype, device, heads, kv_heads, head_dim
        )
        self.native_prefill = (
            not self.flash
            and native_prefill_wins()
            and native.prefill_attention_takes(self.dtype, device, heads, kv_heads, head_dim)
        )

    def allocate(self, num_blocks: int) -> None:
        """(Re)allocate the KV pool: `num_blocks` blocks for sequences plus one scratch block, where the padding rows
        of a captured decode graph write. The previous pool and any graphs captured over it are released first."""
        self.kv_caches = []
        self.graphs = None
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        layers, kv_heads, head_dim = _kv_shape(self.model)
        shape = (kv_heads, num_blocks + 1, self.block_size, head_dim)
        if self.flash:
            shape = flash_attention.cache_shape(num_blocks + 1, self.block_size, kv_heads, head_dim)
        # Zeroed, not empty: padded decode positions read cache slots that were never written, and NaN garbage
        # would survive a zero attention weight.
        pool = _zeroed_pool((layers, 2, *shape), self.dtype, self.device)
        self.kv_caches = [(pool[layer, 0], pool[layer, 1]) for layer in range(layers)]

    def describe(self) -> str:
        """The paths a step takes, for the start-up log: which forward, which projections, which attention."""
        if self.lean is None:
            forward = "transformers' modules"
        else:
            layer_ops = "native layer kernels" if self.lean.fused else "torch ops"
            forward = f"lean Llama forward ({layer_ops}; projections: {self.lean.projections()})"
        if self.flash:
            source = flash_attention.kernel_source() if self.flash_kernels is None else "given kernels"
            attn = f"flash-attention ({source}) over pages of {self.block_size} tokens"
            return f"{forward}; attention: {attn}; {self.dtype} on {self.device}"
        decode = "native kernel over the paged cache" if self.native_decode else "torch matmuls over gathered blocks"
        prefill = "native bf16 kernel over the paged cache" if self.native_prefill else "SDPA"
        if self.native_decode and self.native_prefill:
            short = f"{SHORT_PREFILL_ROWS} rows, or {SHORT_PREFILL_WORK} rows x keys"
            prefill += f" (spans of at most {short}, through the decode kernel)"
        elif self.native_decode:
            prefill += f" (spans of at most {SHORT_PREFILL} tokens through the decode kernel)"
        return f"{forward}; decode attention: {decode}; prefill attention: {prefill}; {self.dtype} on {self.device}"

    @torch.inference_mode()
    def execute(self, items: list[BatchItem]) -> torch.Tensor:
        """Run one packed forward; return float32 logits in item order: each item's `score_rows`, then its last row if
        it samples. A decode graph keeps one row a sequence, so a step that scores prompt rows runs eagerly."""
        decodes = all(len(i.token_ids) == 1 and i.num_computed > 0 and i.sample and not i.score_rows for i in items)
        if self.graphs is not None and decodes:
            replayed = self.graphs.run(
                [i.token_ids[0] for i in items], [i.num_computed for i in items], [i.block_table for i in items]
            )
            if replayed is not None:
                return replayed
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
            keep.extend(start + row for row in item.score_rows)
            if item.sample:
                keep.append(start + n - 1)
            if self.flash:
                continue  # flash-attn takes every request's span at once, below
            if n == 1 and first > 0:
                decode_rows.append(start)
                decode_items.append(item)
            elif self.native_decode and n <= SHORT_PREFILL and self._short(n, first + n):
                # each row of a short prefill attends as a decode would: the request's table, its own length
                decode_rows.extend(range(start, start + n))
                decode_items.extend(BatchItem([], first + i, table, False) for i in range(n))
            else:
                prefills.append(self._prefill_span(start, n, first, table))

        ids, pos, slot_mapping, keep_t = lists_to_device([input_ids, positions, slots, keep], torch.long, self.device)
        meta = AttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=slot_mapping,
            prefills=prefills,
            decode=self._decode_batch(decode_rows, decode_items, len(input_ids)) if decode_items else None,
        )
        if self.flash:
            spans = [Span(len(i.token_ids), i.num_computed + len(i.token_ids), i.block_table) for i in items]
            meta.flash = flash_attention.build_metadata(spans, bs, self.device)
            meta.flash_kernels = self.flash_kernels
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

    def _short(self, q_len: int, ctx_len: int) -> bool:
        """Whether a span of at most SHORT_PREFILL rows attends through the decode kernel, not the prefill one."""
        return not self.native_prefill or q_len <= SHORT_PREFILL_ROWS or q_len * ctx_len <= SHORT_PREFILL_WORK

    def _prefill_span(self, start: int, q_len: int, num_computed: int, table: list[int]) -> PrefillSpan:
        ctx_len = num_computed + q_len
        if self.native_prefill:
            blocks = table[: -(-ctx_len // self.block_size)]
            ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
            return PrefillSpan(start, q_len, ctx_len, None, None, ids)
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
        mask = None if self.native_decode else self._additive_mask(lengths_t, max_blocks)
        return DecodeBatch(
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.long, device=self.device),
            lengths=lengths_t,
            additive_mask=mask,
            every_row=len(rows) == num_rows,  # rows are added in order, so then they are rows 0..T-1
        )

    def _additive_mask(self, lengths: torch.Tensor, max_blocks: int) -> torch.Tensor:
        """[1, B, 1, max_blocks * block_size] float: 0 for each row's first `length` keys, -inf past them."""
        key_pos = torch.arange(max_blocks * self.block_size, device=self.device)
        past = key_pos[None, :] >= lengths[:, None]
        return torch.zeros(past.shape, device=self.device).masked_fill_(past, float("-inf"))[None, :, None, :]

    def decode_forward(self, inputs: DecodeInputs) -> torch.Tensor:
        """A decode step of the lean forward over `inputs` as they are (padding rows included): logits [rows, vocab].
        No host sync and no shape read from data, so it can be captured in a graph."""
        assert self.lean is not None
        rows = torch.arange(inputs.ids.shape[0], device=self.device)
        if self.flash:
            meta = AttentionMetadata(self.kv_caches, inputs.slots, flash=self._flash_decode(inputs))
            meta.flash_kernels = self.flash_kernels
            return self.lean(inputs.ids, inputs.positions, rows, meta)
        mask = None if self.native_decode else self._additive_mask(inputs.lengths, inputs.tables.shape[1])
        decode = DecodeBatch(rows, inputs.tables, inputs.lengths, mask, every_row=True)
        meta = AttentionMetadata(self.kv_caches, inputs.slots, [], decode)
        return self.lean(inputs.ids, inputs.positions, rows, meta)

    def _flash_decode(self, inputs: DecodeInputs) -> FlashMetadata:
        """flash-attn's metadata of a decode step, computed on the device from the static inputs."""
        lengths = inputs.lengths.to(torch.int32)
        width = inputs.tables.shape[1]
        return FlashMetadata(
            cu_seqlens_q=torch.arange(inputs.ids.shape[0] + 1, dtype=torch.int32, device=self.device),
            cu_seqlens_k=flash_attention.offsets(lengths),
            max_seqlen_q=1,
            max_seqlen_k=width * self.block_size,
            block_table=inputs.tables.to(torch.int32),
            seq_lens_k=lengths,
            decode_only=True,
        )

    @torch.inference_mode()
    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int, *, capture: bool = True) -> str:
        """Capture decode graphs (see worker.cuda_graphs); `capture=False` runs them eagerly (the CPU: tests).
        Returns what was done, for the start-up log."""
        if self.lean is None:
            return "decode graphs: none (the model runs transformers' forward, which may sync with the host)"
        max_blocks = -(-max_model_len // self.block_size)
        reads_lengths = self.native_decode or self.flash
        _, kv_heads, head_dim = _kv_shape(self.model)
        gathered_bytes = 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()  # K and V
        self.graphs = DecodeGraphs(
            self.decode_forward,
            sizes=capture_sizes(max_num_seqs),
            widths=table_widths(max_blocks, self.block_size, reads_lengths=reads_lengths),
            block_size=self.block_size,
            scratch_block=self.scratch_block,
            vocab_size=int(self.model.config.get_text_config().vocab_size),
            device=self.device,
            capture=capture,
            max_gathered_tokens=None if reads_lengths else GATHERED_BYTES_PER_LAYER // gathered_bytes,
        )
        graphs = self.graphs
        done = f"decode graphs: {len(graphs.shapes)} of batch sizes {graphs.sizes}, table widths {graphs.widths} blocks"
        if not capture:
            return done + ", run eagerly"
        return done + f", captured in {graphs.capture_seconds:.1f} s, {graphs.capture_bytes / 2**20:.0f} MiB"


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

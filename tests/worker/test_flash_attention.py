"""The flash-attn backend's glue (metadata, store, cache layout, kernel dispatch), run on CPU against a torch model of
the two flash-attn kernels' documented contract and checked against plain attention over contiguous K/V. One test,
marked gpu, runs the real kernels on CUDA against the same plain attention. Then the backend inside the model runner
and the engine, with the same torch model of the kernels standing in for flash-attn's."""

from __future__ import annotations

import copy
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import varlen as torch_varlen
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import make_engine, random_prompts, reference, run_all
from tests.worker.test_llama_forward import mixed_batch
from worker import flash_attention as fa
from worker.flash_attention import Kernels, Span, cache_shape
from worker.messages import SamplingParams
from worker.model_runner import BatchItem, ModelRunner


def paged_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, ctx_len: int, scale: float
) -> torch.Tensor:
    """The kernels' contract for one sequence: q [S, H, D] are the last S of ctx_len positions, whose K/V lie in the
    pages `blocks` in order; causal aligned to the bottom right; query head h reads KV head h // (H // Hkv)."""
    rows, heads, _ = q.shape
    keys = k_cache[blocks].flatten(0, 1)[:ctx_len]  # [L, Hkv, D]
    values = v_cache[blocks].flatten(0, 1)[:ctx_len]
    group = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,lhd->hsl", q.float(), keys.float()) * scale
    query_pos = torch.arange(rows, device=q.device)[:, None] + ctx_len - rows
    visible = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hsl,lhd->shd", probs, values.float()).to(q.dtype)


def pages(block_table: torch.Tensor, row: int, ctx_len: int, block_size: int) -> torch.Tensor:
    needed = -(-ctx_len // block_size)
    assert needed <= block_table.shape[1], "the block table is too narrow for the context"
    return block_table[row, :needed].long()


@dataclass
class ReferenceKernels:
    """flash_attn_varlen_func and flash_attn_with_kvcache (paged) in plain torch; records which one ran."""

    calls: list[str] = field(default_factory=list)

    def varlen(
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
    ) -> torch.Tensor:
        self.calls.append("varlen")
        assert causal and k.dim() == 4 and k.shape == v.shape
        for index in (cu_seqlens_q, cu_seqlens_k, block_table):
            assert index.dtype == torch.int32 and index.is_contiguous()
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert len(cu_q) == len(cu_k) == block_table.shape[0] + 1 and cu_q[-1] == q.shape[0]
        out = torch.empty_like(q)
        for b in range(len(cu_q) - 1):
            ctx_len = cu_k[b + 1] - cu_k[b]
            assert cu_q[b + 1] - cu_q[b] <= max_seqlen_q and ctx_len <= max_seqlen_k
            blocks = pages(block_table, b, ctx_len, k.shape[1])
            out[cu_q[b] : cu_q[b + 1]] = paged_rows(q[cu_q[b] : cu_q[b + 1]], k, v, blocks, ctx_len, softmax_scale)
        return out

    def with_kvcache(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor,
        softmax_scale: float,
        causal: bool,
    ) -> torch.Tensor:
        self.calls.append("with_kvcache")
        assert causal and q.dim() == 4 and k_cache.dim() == 4
        assert cache_seqlens.dtype == block_table.dtype == torch.int32
        assert cache_seqlens.shape == (q.shape[0],) and block_table.shape[0] == q.shape[0]
        out = torch.empty_like(q)
        for b, ctx_len in enumerate(cache_seqlens.tolist()):
            blocks = pages(block_table, b, ctx_len, k_cache.shape[1])
            out[b] = paged_rows(q[b], k_cache, v_cache, blocks, ctx_len, softmax_scale)
        return out

    def kernels(self) -> Kernels:
        return Kernels(self.varlen, self.with_kvcache)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, H, D] are the last S positions of the contiguous context k, v [L, Hkv, D]; float32 -> [S, H, D]."""
    rows, length = q.shape[0], k.shape[0]
    causal = (
        torch.arange(length, device=q.device)[None, :] <= torch.arange(length - rows, length, device=q.device)[:, None]
    )
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(),
        k.transpose(0, 1).float(),
        v.transpose(0, 1).float(),
        attn_mask=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


@dataclass
class Step:
    out: torch.Tensor  # [T, H, D] from fa.attend
    expected: torch.Tensor  # [T, H, D] float32 from plain attention
    meta: fa.FlashMetadata
    tables: list[list[int]]


def run_step(
    requests: list[tuple[int, int]],  # (q_len, ctx_len) per request, in packed order
    block_size: int,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    kernels: Kernels | None = None,
    max_blocks: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    unwritten: float = float("nan"),
    seed: int = 0,
) -> Step:
    """Build a paged cache whose requests own shuffled, non-contiguous blocks; store each request's earlier tokens
    (as past steps did), then this step's tokens in one packed store; attend; and compute plain attention."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    needed = [-(-ctx // block_size) for _, ctx in requests]
    ids = list(range(sum(needed) + 2))
    random.Random(seed).shuffle(ids)
    tables, start = [], 0
    for n in needed:
        tables.append(ids[start : start + n])
        start += n
    tables[0].append(ids[-1])  # a block allocated ahead of need: never read
    k_cache = torch.full(
        fa.cache_shape(len(ids), block_size, kv_heads, head_dim), unwritten, dtype=dtype, device=device
    )
    v_cache = torch.full_like(k_cache, unwritten)

    def slots(table: list[int], first: int, last: int) -> torch.Tensor:
        return torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(first, last)])

    scale = head_dim**-0.5
    queries, new_k, new_v, new_slots, expected = [], [], [], [], []
    for (q_len, ctx_len), table in zip(requests, tables, strict=True):
        keys, values, q = (
            rand(ctx_len, kv_heads, head_dim),
            rand(ctx_len, kv_heads, head_dim),
            rand(q_len, heads, head_dim),
        )
        cached = ctx_len - q_len
        if cached:
            fa.store(k_cache, v_cache, keys[:cached], values[:cached], slots(table, 0, cached).to(device))
        queries.append(q)
        new_k.append(keys[cached:])
        new_v.append(values[cached:])
        new_slots.append(slots(table, cached, ctx_len))
        expected.append(plain_attention(q, keys, values, scale))
    fa.store(k_cache, v_cache, torch.cat(new_k), torch.cat(new_v), torch.cat(new_slots).to(device))
    spans = [Span(q_len, ctx_len, table) for (q_len, ctx_len), table in zip(requests, tables, strict=True)]
    meta = fa.build_metadata(spans, block_size, device, max_blocks)
    out = fa.attend(torch.cat(queries), k_cache, v_cache, meta, scale, kernels)
    return Step(out, torch.cat(expected), meta, tables)


FRESH, CHUNKED, DECODE, LONE_TOKEN = (19, 19), (7, 30), (1, 17), (1, 1)


def test_cache_shape_is_flash_attn_paged_layout() -> None:
    assert fa.cache_shape(10, 256, 2, 64) == (10, 256, 2, 64)
    assert fa.PAGE_MULTIPLE == 256


def test_metadata_of_a_mixed_step() -> None:
    spans = [Span(5, 5, [7, 2]), Span(3, 9, [1, 4, 6, 8]), (1, 6, [3, 0, 5])]
    meta = fa.build_metadata(spans, block_size=4, device="cpu")
    assert meta.cu_seqlens_q.tolist() == [0, 5, 8, 9]
    assert meta.cu_seqlens_k.tolist() == [0, 5, 14, 20]
    assert meta.seq_lens_k.tolist() == [5, 9, 6]
    assert (meta.max_seqlen_q, meta.max_seqlen_k, meta.decode_only) == (5, 9, False)
    # only the blocks that hold the context, padded with block 0
    assert meta.block_table.tolist() == [[7, 2, 0], [1, 4, 6], [3, 0, 0]]
    for tensor in (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.seq_lens_k, meta.block_table):
        assert tensor.dtype == torch.int32 and tensor.is_contiguous()


def test_metadata_of_decodes_keeps_its_shapes_from_step_to_step() -> None:
    first = fa.build_metadata([(1, 3, [4]), (1, 9, [0, 1, 2])], block_size=4, device="cpu", max_blocks=6)
    later = fa.build_metadata([(1, 8, [4, 5]), (1, 22, [0, 1, 2, 3, 6, 7])], block_size=4, device="cpu", max_blocks=6)
    for meta in (first, later):
        assert meta.decode_only and meta.max_seqlen_q == 1
        assert meta.block_table.shape == (2, 6) and meta.seq_lens_k.shape == (2,)
    assert first.block_table.tolist() == [[4, 0, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0]]
    assert later.seq_lens_k.tolist() == [8, 22]


@pytest.mark.parametrize(
    ("spans", "max_blocks", "message"),
    [
        ([], None, "at least one"),
        ([(0, 4, [1])], None, "q_len=0"),
        ([(5, 4, [1])], None, "q_len=5"),
        ([(1, 9, [1, 2])], None, "need 3 blocks"),
        ([(1, 9, [1, 2, 3])], 2, "max_blocks=2"),
    ],
)
def test_metadata_rejects_inconsistent_spans(
    spans: list[tuple[int, int, list[int]]], max_blocks: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fa.build_metadata(spans, block_size=4, device="cpu", max_blocks=max_blocks)


def test_store_writes_each_token_at_its_slot_and_nowhere_else() -> None:
    k_cache = torch.zeros(fa.cache_shape(5, 4, 2, 3), dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    fa.store(k_cache, v_cache, k, v, torch.tensor([9, 2, 17]))
    for row, (block, offset) in enumerate([(2, 1), (0, 2), (4, 1)]):
        assert torch.equal(k_cache[block, offset], k[row].to(torch.bfloat16))
        assert torch.equal(v_cache[block, offset], v[row].to(torch.bfloat16))
    assert int(k_cache.flatten(0, 1).abs().sum(dim=(1, 2)).ne(0).sum()) == 3
    assert int(v_cache.flatten(0, 1).abs().sum(dim=(1, 2)).ne(0).sum()) == 3


def test_mixed_batch_goes_through_varlen_and_matches_plain_attention() -> None:
    reference = ReferenceKernels()
    step = run_step([FRESH, CHUNKED, DECODE, LONE_TOKEN], block_size=8, kernels=reference.kernels())
    assert reference.calls == ["varlen"] and not step.meta.decode_only
    torch.testing.assert_close(step.out, step.expected, atol=1e-5, rtol=1e-5)


def test_decode_only_batch_goes_through_with_kvcache_at_fixed_width() -> None:
    reference = ReferenceKernels()
    requests = [(1, 3), (1, 17), (1, 9), (1, 29)]
    step = run_step(requests, block_size=4, kernels=reference.kernels(), max_blocks=8)
    assert reference.calls == ["with_kvcache"] and step.meta.decode_only
    assert step.meta.block_table.shape == (4, 8)
    assert step.meta.block_table[0, 1:].tolist() == [0] * 7
    torch.testing.assert_close(step.out, step.expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
def test_grouped_query_attention(heads: int, kv_heads: int) -> None:
    for requests in ([FRESH, CHUNKED, DECODE], [DECODE, LONE_TOKEN, (1, 40)]):
        step = run_step(requests, block_size=4, heads=heads, kv_heads=kv_heads, kernels=ReferenceKernels().kernels())
        torch.testing.assert_close(step.out, step.expected, atol=1e-5, rtol=1e-5)


def test_shuffled_blocks_of_flash_attn_page_size() -> None:
    """Pages of 256 as the real kernels need; contexts end inside, at and past page boundaries."""
    for requests in ([(300, 300), (40, 600), (1, 513), (1, 256)], [(1, 257), (1, 768), (1, 5)]):
        step = run_step(requests, block_size=256, head_dim=4, kernels=ReferenceKernels().kernels(), seed=3)
        assert any(t != list(range(t[0], t[0] + len(t))) for t in step.tables if len(t) > 1)
        torch.testing.assert_close(step.out, step.expected, atol=1e-5, rtol=1e-5)


def test_attend_refuses_queries_in_another_dtype_than_the_cache() -> None:
    meta = fa.build_metadata([(1, 1, [0])], block_size=4, device="cpu")
    cache = torch.zeros(fa.cache_shape(1, 4, 1, 8), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        fa.attend(torch.zeros(1, 1, 8), cache, cache, meta, 1.0, ReferenceKernels().kernels())


def test_real_kernels_need_pages_of_256() -> None:
    meta = fa.build_metadata([(1, 1, [0])], block_size=16, device="cpu")
    cache = torch.zeros(fa.cache_shape(1, 16, 1, 8), dtype=torch.float16)
    with pytest.raises(ValueError, match="256"):
        fa.attend(torch.zeros(1, 1, 8, dtype=torch.float16), cache, cache, meta, 1.0)


@pytest.mark.skipif(fa.available(), reason="flash-attn is installed here")
def test_without_flash_attn_torch_serves_else_the_backend_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not fa.available()
    assert "flash_attn" not in sys.modules
    assert fa.torch_paged_available(), "torch 2.12 and later page their varlen attention"
    assert fa.kernel_source() == f"torch {torch.__version__} varlen_attn"
    monkeypatch.setattr(fa, "torch_paged_available", lambda: False)
    fa.flash_kernels.cache_clear()
    try:
        assert fa.kernel_source() is None
        meta = fa.build_metadata([(1, 1, [0])], block_size=256, device="cpu")
        cache = torch.zeros(fa.cache_shape(1, 256, 1, 8), dtype=torch.float16)
        with pytest.raises(RuntimeError, match="flash-attn"):
            fa.attend(torch.zeros(1, 1, 8, dtype=torch.float16), cache, cache, meta, 1.0)
    finally:
        fa.flash_kernels.cache_clear()


@dataclass
class ReferenceVarlen:
    """torch.nn.attention.varlen.varlen_attn's documented contract over a paged cache, in plain torch."""

    calls: int = 0

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seq_q: torch.Tensor,
        cu_seq_k: torch.Tensor | None,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
        seqused_k: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.calls += 1
        assert window_size == (-1, 0) and enable_gqa and scale is not None  # causal, bottom-right aligned
        assert block_table is not None and seqused_k is not None  # a paged cache needs both
        for index in (cu_seq_q, seqused_k, block_table):
            assert index.dtype == torch.int32
        cu_q, used = cu_seq_q.tolist(), seqused_k.tolist()
        assert len(cu_q) == len(used) + 1 == block_table.shape[0] + 1 and cu_q[-1] == query.shape[0]
        if cu_seq_k is not None:
            assert (cu_seq_k[1:] - cu_seq_k[:-1]).tolist() == used
        out = torch.empty_like(query)
        for b, ctx_len in enumerate(used):
            assert cu_q[b + 1] - cu_q[b] <= max_q and ctx_len <= max_k
            rows = slice(cu_q[b], cu_q[b + 1])
            blocks = pages(block_table, b, ctx_len, key.shape[1])
            out[rows] = paged_rows(query[rows], key, value, blocks, ctx_len, scale)
        return out


@pytest.mark.parametrize(
    ("requests", "max_blocks"),
    [([(6, 6), (3, 9), (1, 5), (1, 1)], None), ([(1, 7), (1, 16), (1, 1)], 6)],
    ids=["mixed", "decode_only"],
)
def test_torch_varlen_attention_serves_the_kernels_contract(
    monkeypatch: pytest.MonkeyPatch, requests: list[tuple[int, int]], max_blocks: int | None
) -> None:
    """torch's varlen_attn (CUDA only) stood in for by its documented contract: the adapters pass what it needs."""
    reference_varlen = ReferenceVarlen()
    monkeypatch.setattr(torch_varlen, "varlen_attn", reference_varlen)
    step = run_step(requests, block_size=4, kernels=fa.torch_kernels(), max_blocks=max_blocks, seed=5)
    torch.testing.assert_close(step.out, step.expected, atol=1e-5, rtol=1e-5)
    assert reference_varlen.calls == 1


def cuda_kernels(source: str) -> Kernels | None:
    """The kernels of one source on CUDA; skips the test where that source is not here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if source == "flash-attn" and not fa.available():
        pytest.skip("needs flash-attn")
    if source == "torch" and not fa.torch_paged_available():
        pytest.skip("needs torch 2.12+")
    return None if source == "flash-attn" else fa.torch_kernels()  # None: attend takes flash-attn's


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["flash-attn", "torch"])
@pytest.mark.parametrize(
    ("requests", "max_blocks"),
    [([(300, 300), (40, 600), (1, 513), (1, 1)], None), ([(1, 257), (1, 768), (1, 5), (1, 1)], 4)],
    ids=["mixed", "decode_only"],
)
def test_the_real_kernels_match_plain_attention_on_cuda(
    source: str, requests: list[tuple[int, int]], max_blocks: int | None
) -> None:
    step = run_step(
        requests,
        block_size=256,
        heads=8,
        kv_heads=2,
        head_dim=128,
        kernels=cuda_kernels(source),
        max_blocks=max_blocks,
        dtype=torch.bfloat16,
        device="cuda",
        unwritten=0.0,
    )
    assert step.out.dtype == torch.bfloat16
    torch.testing.assert_close(step.out.float(), step.expected, atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def flash_runner(model: PreTrainedModel, kernels: ReferenceKernels, num_blocks: int) -> ModelRunner:
    runner = ModelRunner(copy.deepcopy(model), num_blocks, block_size=4, device=torch.device("cpu"), flash=True)
    runner.flash_kernels = kernels.kernels()
    return runner


def test_the_runner_over_flash_attn_kernels_computes_what_the_paged_path_does(model: PreTrainedModel) -> None:
    kernels = ReferenceKernels()
    flash = flash_runner(model, kernels, num_blocks=8)
    paged = ModelRunner(copy.deepcopy(model), 8, block_size=4, device=torch.device("cpu"), flash=False)
    assert flash.kv_caches[0][0].shape == cache_shape(9, 4, *flash.kv_caches[0][0].shape[2:])  # 8 + scratch
    steps = mixed_batch(flash, int(model.config.vocab_size))
    steps.append([BatchItem([7], 10, [0, 1, 2], True), BatchItem([8], 12, [4, 5, 6, 7], True)])  # decodes only
    for step in steps:
        torch.testing.assert_close(flash.execute(step), paged.execute(step), rtol=1e-5, atol=1e-5)
    layers = int(model.config.num_hidden_layers)
    assert kernels.calls == ["varlen"] * 2 * layers + ["with_kvcache"] * layers
    assert "flash-attention (given kernels) over pages of 4 tokens" in flash.describe()


def test_an_engine_over_flash_attn_kernels_with_decode_graphs_equals_generate(model: PreTrainedModel) -> None:
    prompts = random_prompts(int(model.config.vocab_size), [1, 3, 7, 12, 16, 23])
    engine = make_engine(model, max_num_seqs=6)
    kernels = ReferenceKernels()
    engine.runner = flash_runner(model, kernels, engine.block_manager.num_blocks)
    engine.runner.capture_decode_graphs(max_num_seqs=6, max_model_len=engine.max_model_len, capture=False)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    got = run_all(engine, prompts, params).tokens
    assert got == {rid: reference(model, prompt, params.max_tokens) for rid, prompt in prompts.items()}
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 5
    assert {"varlen", "with_kvcache"} <= set(kernels.calls)


def test_torch_varlen_does_not_log_every_call() -> None:
    """It logs its backend at INFO on each call: in a worker logging INFO, a line for every layer of every step."""
    fa.torch_kernels()
    assert not logging.getLogger(torch_varlen.__name__).isEnabledFor(logging.INFO)

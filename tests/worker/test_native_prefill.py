"""The C prefill-attention kernel (bfloat16, over the paged cache) against float64 attention and against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from worker import native

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not native.prefill_attention_takes(torch.bfloat16, CPU, 8, 2, 64),
    reason="no AVX-512 BF16 or no C compiler: prefill keeps SDPA",
)


def paged(
    kv_heads: int, head_dim: int, block_size: int, ctx_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches [Hkv, blocks, bs, D] in bfloat16 with the request's blocks scattered, its table, and its slots."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-ctx_len // block_size) + 5
    k = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).bfloat16()
    v = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).bfloat16()
    table = torch.randperm(num_blocks, generator=gen)[: -(-ctx_len // block_size)].contiguous()
    slots = (table[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()[:ctx_len]
    return k, v, table, slots


def queries(heads: int, q_len: int, head_dim: int, kv_heads: int, seed: int) -> torch.Tensor:
    """q [H, q_len, D] as the forward hands it over: a transposed slice of fused qkv rows (strided)."""
    gen = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(q_len, heads + 2 * kv_heads, head_dim, generator=gen).bfloat16()
    return qkv[:, :heads].transpose(0, 1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, sdpa: bool = False
) -> torch.Tensor:
    """[q_len, H, D]: causal attention of the last q_len positions over the gathered context, in `dtype`."""
    kv_heads, _, _, head_dim = k.shape
    ctx_len, q_len = slots.numel(), q.shape[1]
    keys = k.view(kv_heads, -1, head_dim)[:, slots].to(dtype)
    values = v.view(kv_heads, -1, head_dim)[:, slots].to(dtype)
    mask = torch.arange(ctx_len)[None, :] <= torch.arange(ctx_len - q_len, ctx_len)[:, None]
    out = F.scaled_dot_product_attention(
        q.to(dtype)[None], keys[None], values[None], attn_mask=mask, scale=head_dim**-0.5, enable_gqa=True
    )
    return out[0].transpose(0, 1)


CASES = [  # heads, KV heads, head dim, block size, query rows, context
    (9, 3, 64, 16, 1, 1),  # one row, one key
    (9, 3, 64, 16, 7, 7),  # fewer rows than a tile
    (9, 3, 64, 16, 200, 200),  # a whole prompt: tiles and key rounds cut mid-way
    (9, 3, 64, 16, 100, 137),  # a chunk after cached tokens
    (32, 8, 64, 16, 130, 1000),  # Llama-3.2-1B's heads, a late chunk of a long prompt
    (8, 2, 128, 7, 50, 333),  # head_dim 128 (Llama-3.2-3B), a block size that divides nothing
]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "q_len", "ctx_len"), CASES)
def test_equals_float64_attention_as_closely_as_sdpa(
    heads: int, kv_heads: int, head_dim: int, block_size: int, q_len: int, ctx_len: int
) -> None:
    k, v, table, slots = paged(kv_heads, head_dim, block_size, ctx_len, seed=q_len * ctx_len)
    q = queries(heads, q_len, head_dim, kv_heads, seed=ctx_len)
    out = torch.full((q_len, heads, head_dim), float("nan")).bfloat16()
    assert native.prefill_attention(q, k, v, table, ctx_len, out, head_dim**-0.5)
    want = attention(q, k, v, slots, torch.float64)
    sdpa = attention(q, k, v, slots, torch.bfloat16)
    err = (out.double() - want).abs().max().item()
    sdpa_err = (sdpa.double() - want).abs().max().item()
    # both round the probabilities and the output to bfloat16: the kernel may not stray further than SDPA does
    assert err <= 1.25 * sdpa_err + 1e-3, (err, sdpa_err)
    assert (out.double() - sdpa.double()).abs().mean().item() < 1e-3  # and agrees with it to the last bit or so


def test_rows_and_threads_do_not_change_the_result() -> None:
    """A row's output is the same whether it is prefilled alone or in a chunk, on one thread or two."""
    k, v, table, _ = paged(3, 64, 16, 300, seed=5)
    q = queries(9, 300, 64, 3, seed=5)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty(300, 9, 64, dtype=torch.bfloat16)
            assert native.prefill_attention(q, k, v, table, 300, out, 0.125)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    last = torch.empty(1, 9, 64, dtype=torch.bfloat16)
    assert native.prefill_attention(q[:, -1:], k, v, table, 300, last, 0.125)
    assert torch.equal(last[0], outs[0][-1])


def test_large_scores_do_not_overflow() -> None:
    k = torch.full((1, 4, 16, 64), 30.0).bfloat16()
    v = torch.arange(4 * 16 * 64, dtype=torch.float32).view(1, 4, 16, 64).div(100).bfloat16()
    q = torch.ones(1, 3, 64).bfloat16()
    out = torch.empty(3, 1, 64, dtype=torch.bfloat16)
    assert native.prefill_attention(q, k, v, torch.tensor([2]), 3, out, 1.0)
    # equal scores: each row the mean of the values it sees
    for row in range(3):
        want = v[0, 2, : row + 1].float().mean(0)
        torch.testing.assert_close(out[row, 0].float(), want, rtol=4e-3, atol=4e-3)


def test_refuses_what_it_does_not_take_and_checks_the_table() -> None:
    k, v, table, _ = paged(2, 64, 16, 40, seed=1)
    q = queries(4, 8, 64, 2, seed=1)
    out = torch.empty(8, 4, 64, dtype=torch.bfloat16)
    assert not native.prefill_attention(q.float(), k.float(), v.float(), table, 40, out.float(), 0.1)
    assert not native.prefill_attention(q[:3], k, v, table, 40, out[:, :3], 0.1)  # 3 heads over 2
    assert not native.prefill_attention(q, k, v, table.int(), 40, out, 0.1)
    assert not native.prefill_attention_takes(torch.float32, CPU, 8, 2, 64)
    assert not native.prefill_attention_takes(torch.bfloat16, CPU, 8, 2, 96)
    assert not native.prefill_attention_takes(torch.bfloat16, torch.device("meta"), 8, 2, 64)
    bad = table.clone()
    bad[1] = 10_000
    with pytest.raises(IndexError, match="block id 10000"):
        native.prefill_attention(q, k, v, bad, 40, out, 0.1)
    with pytest.raises(IndexError, match="longer than the table"):
        native.prefill_attention(q, k, v, table[:1], 40, out, 0.1)


@pytest.fixture(scope="module")
def head64_runner_model() -> PreTrainedModel:
    """A random Llama with SmolLM2's head size (64) and GQA, in bfloat16: the prefill kernel takes its spans."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).bfloat16().eval()


def test_chunks_take_the_kernel_their_work_calls_for_and_give_the_whole_prompts_logits(
    head64_runner_model: PreTrainedModel,
) -> None:
    """A 600-token prompt fed in chunks of 16 (past the first few, each attends hundreds of keys: the prefill kernel),
    of 2 (the decode kernel) and whole, and 14-token prompts (little work: the decode kernel, batched with decodes):
    the last logits agree within bfloat16's rounding."""
    import copy

    from worker.model_runner import SHORT_PREFILL_ROWS, SHORT_PREFILL_WORK, BatchItem, ModelRunner

    def runner() -> ModelRunner:
        run = ModelRunner(copy.deepcopy(head64_runner_model), num_blocks=200, block_size=16, device=CPU)
        run.native_prefill = True  # the kernel's paths, also where AMX makes SDPA the default
        return run

    whole = runner()
    assert whole.native_prefill and whole.native_decode
    assert whole._short(14, 14) and whole._short(SHORT_PREFILL_ROWS, 4096)
    assert not whole._short(16, 600) and not whole._short(3, 4096)
    assert whole._short(32, SHORT_PREFILL_WORK // 32) and not whole._short(32, SHORT_PREFILL_WORK // 32 + 1)

    prompt = torch.randint(3, 256, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    table = list(range(40))
    reference = whole.execute([BatchItem(prompt, 0, table, True)])

    def chunked(size: int) -> torch.Tensor:
        run = runner()
        for first in range(0, len(prompt) - size, size):
            run.execute([BatchItem(prompt[first : first + size], first, table, False)])
        last = (len(prompt) - 1) // size * size
        return run.execute([BatchItem(prompt[last:], last, table, True)])

    scale = reference.abs().max().item()
    for size in (16, 2):
        assert (chunked(size) - reference).abs().max().item() < 0.03 * scale
    short = [torch.randint(3, 256, (14,), generator=torch.Generator().manual_seed(s)).tolist() for s in (4, 5)]
    batched = runner().execute([BatchItem(p, 0, [50 + i], True) for i, p in enumerate(short)])
    alone = torch.cat([runner().execute([BatchItem(p, 0, [50], True)]) for p in short])
    assert (batched - alone).abs().max().item() < 0.03 * alone.abs().max().item()

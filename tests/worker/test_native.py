"""The C decode-attention kernel against attention computed in float64 from gathered blocks, and its build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from worker import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no AVX-512 or no C compiler: the torch path runs")
# a process that imports this checkout's worker package, with nothing else from the environment
BARE_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(native.__file__).parent.parent)}


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, H, D]; caches [Hkv, blocks, bs, D]: each sequence's keys gathered, softmax(q k^T) v in float64."""
    kv_heads, _, block_size, head_dim = k.shape
    group = q.shape[1] // kv_heads
    out = []
    for b, n in enumerate(lengths.tolist()):
        slots = torch.tensor([int(tables[b, p // block_size]) * block_size + p % block_size for p in range(n)])
        keys = k.reshape(kv_heads, -1, head_dim)[:, slots].double().repeat_interleave(group, 0)  # [H, n, D]
        values = v.reshape(kv_heads, -1, head_dim)[:, slots].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b].double(), keys) * scale
        out.append(torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), values))
    return torch.stack(out)


SHAPES = [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 128, 7), (8, 2, 64, 40)]  # heads, KV heads, head dim, block size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES)
def test_equals_float64_attention(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks, batch = 40, 6
    k = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    v = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    lengths = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 37, 5 * block_size], dtype=torch.long)
    max_blocks = -(-int(lengths.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(batch)])
    # q as the forward hands it over: a slice of the fused qkv rows, so rows are strided
    qkv = torch.randn(batch, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads]
    got = native.decode_attention(q, k, v, tables, lengths, head_dim**-0.5)
    assert got is not None and got.dtype == dtype and got.shape == (batch, heads, head_dim)
    want = reference(q, k, v, tables, lengths, head_dim**-0.5)
    # float32: summation order only; bfloat16: the output's own rounding (half an ulp, 2^-9 relative)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_padded_tables_and_large_scores() -> None:
    """Table entries past a sequence's length are never read, and big logits do not overflow the softmax."""
    k = torch.full((1, 4, 4, 16), 30.0)
    v = torch.arange(4 * 4 * 16, dtype=torch.float32).view(1, 4, 4, 16)
    tables = torch.tensor([[2, 999_999]])  # the second entry would be out of bounds if read
    got = native.decode_attention(torch.ones(1, 1, 16), k, v, tables, torch.tensor([3]), 1.0)
    assert got is not None
    torch.testing.assert_close(got[0, 0], v[0, 2, :3].mean(0))  # equal scores: the mean of the three values


def test_refuses_what_it_does_not_take() -> None:
    k = torch.zeros(2, 4, 4, 16)
    tables, lengths = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    assert native.decode_attention(torch.zeros(1, 3, 16), k, k, tables, lengths, 1.0) is None  # 3 heads over 2
    half = k.half()
    assert native.decode_attention(torch.zeros(1, 2, 16).half(), half, half, tables, lengths, 1.0) is None
    assert not native.decode_attention_takes(torch.float32, torch.device("cpu"), 8, 2, 24)  # head_dim % 16
    assert native.decode_attention_takes(torch.bfloat16, torch.device("cpu"), 8, 2, 64)


def test_switched_off_by_environment() -> None:
    code = "from worker import native; print(native.library() is None)"
    env = {"TOKENMILL_NATIVE": "0", **BARE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_built_once_per_source_compiler_and_cpu(tmp_path: Path) -> None:
    """A second process loads the library the first built instead of compiling it again."""
    code = (
        "import sys; from pathlib import Path; from worker import native; native.use_cache_dir(Path(sys.argv[1]));"
        "lib = native.library(); print(lib._name if lib else None)"
    )
    env = BARE_ENV
    first = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    built = Path(first.stdout.strip())
    assert built.parent == tmp_path / "native" and built.exists()
    stamp = built.stat().st_mtime_ns
    second = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    assert second.stdout == first.stdout and built.stat().st_mtime_ns == stamp
    assert list(built.parent.iterdir()) == [built]  # no scratch left behind


def test_threads_split_the_work_without_changing_it() -> None:
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 30, 8, 32, generator=gen).bfloat16()
    v = torch.randn(2, 30, 8, 32, generator=gen).bfloat16()
    q = torch.randn(7, 6, 32, generator=gen).bfloat16()
    tables = torch.stack([torch.randperm(30, generator=gen)[:4] for _ in range(7)])
    lengths = torch.tensor([1, 5, 8, 9, 20, 31, 32])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.decode_attention(q, k, v, tables, lengths, 0.2)
        torch.set_num_threads(2)
        two = native.decode_attention(q, k, v, tables, lengths, 0.2)
    finally:
        torch.set_num_threads(before)
    assert one is not None and two is not None and torch.equal(one, two)


@pytest.mark.parametrize("cols", [1, 15, 16, 49_152, 1000])
def test_argmax_equals_torch(cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(12, cols, generator=gen)
    x[1] = float("-inf")  # nothing left: index 0, as torch
    x[2, cols // 2 :] = x[2].max() + 1  # ties: the first
    x[3, -1] = float("nan")  # NaN counts as the largest
    x[4, cols // 3] = float("nan")
    x[4, -1] = float("nan")
    x[5] = x[5].round()  # many ties
    x[6, -1] = float("inf")
    x[7, 0] = 0.0
    x[7, 1:] = -0.0  # equal values of different signs
    assert torch.equal(native.argmax(x), x.argmax(dim=-1))
    assert torch.equal(native.argmax(x[:, : max(1, cols - 3)]), x[:, : max(1, cols - 3)].argmax(dim=-1))  # strided


def test_argmax_keeps_torch_for_what_it_does_not_take() -> None:
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(native.argmax(x), x.argmax(dim=-1))
    assert torch.equal(native.argmax(x.float().t()), x.float().t().argmax(dim=-1))  # columns not contiguous


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between a and b (same-sign finite values)."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_hfs_residual_add_and_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = (torch.randn(9, 576, generator=gen) * 3).to(dtype)
    delta = torch.randn(9, 576, generator=gen).to(dtype)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    with torch.inference_mode():
        summed = hidden + delta
        want = norm(summed)
    inout = hidden.clone()
    got = native.add_rms_norm(inout, delta, norm.weight.detach(), 1e-5)
    assert torch.equal(inout, summed)  # the residual stream: exactly torch's add
    # the mean's summation order differs from torch's; in bfloat16 that is at most one unit in the last place, rarely
    plain = native.add_rms_norm(hidden.clone(), None, norm.weight.detach(), 1e-5)
    with torch.inference_mode():
        plain_want = norm(hidden)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(plain, plain_want, rtol=1e-6, atol=1e-6)
    else:
        apart = ulps_apart(got, want)
        assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) < 0.01
        assert int(ulps_apart(plain, plain_want).max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_is_hfs_rotary_and_a_cache_write(dtype: torch.dtype) -> None:
    heads, kv_heads, head_dim, tokens = 6, 2, 64, 5
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 50
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    q, k = qkv[None, :, :heads].transpose(1, 2), qkv[None, :, heads : heads + kv_heads].transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])  # [1, heads, T, D]
    k_cache = torch.zeros(kv_heads, 4, 4, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 0, 9, 15, 4])
    rotated = qkv.clone()
    native.rope_store(rotated, cos, sin, heads, kv_heads, k_cache, v_cache, slots)
    assert torch.equal(rotated[:, :heads], want_q[0].transpose(0, 1))  # the same roundings as HF's, bit for bit
    assert torch.equal(rotated[:, heads : heads + kv_heads], want_k[0].transpose(0, 1))
    assert torch.equal(rotated[:, heads + kv_heads :], qkv[:, heads + kv_heads :])  # values untouched
    flat_k, flat_v = k_cache.view(kv_heads, 16, head_dim), v_cache.view(kv_heads, 16, head_dim)
    assert torch.equal(flat_k[:, slots], want_k[0])
    assert torch.equal(flat_v[:, slots], qkv[:, heads + kv_heads :].transpose(0, 1))
    untouched = [s for s in range(16) if s not in slots.tolist()]
    assert not flat_k[:, untouched].any() and not flat_v[:, untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_hfs_gated_activation(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(7, 2 * 1536, generator=gen) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -20.0, 0.0, -0.0, 20.0, 90.0, 200.0]).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = native.silu_mul(gate_up)
    # exp differs from torch's in the last bit now and then, which in bfloat16 can move a rounding by one place
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        apart = ulps_apart(got, want)
        assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) < 0.01


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """GGUF blocks uint8 [rows, cols / 32 * block bytes] of random quants and scales as a real file holds them."""
    gen = torch.Generator().manual_seed(seed)
    count = rows * cols // 32
    scale = (torch.rand(count, 1, generator=gen) * 0.05 + 1e-3).half()
    if kind == "Q4_1":
        low = (-8 * scale.float() * torch.rand(count, 1, generator=gen)).half()
        quants = torch.randint(0, 256, (count, 16), dtype=torch.uint8, generator=gen)
        parts = [scale.view(torch.uint8), low.view(torch.uint8), quants]
    else:
        quants = torch.randint(-128, 128, (count, 32), dtype=torch.int8, generator=gen)
        parts = [scale.view(torch.uint8), quants.view(torch.uint8)]
    return torch.cat(parts, dim=1).reshape(rows, -1)


def gguf_decoded(kind: str, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """gguf-py's own dequantization: the float32 weights transformers loads from these blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    weights = dequantize(blocks.numpy(), GGMLQuantizationType[kind])
    return torch.from_numpy(weights.reshape(blocks.shape[0], cols))


AMX_PATHS = [False, True] if native.gguf_amx() else [False]


@pytest.mark.parametrize("amx", AMX_PATHS, ids=lambda amx: "amx" if amx else "fma")
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize(("rows", "cols"), [(16, 32), (80, 96), (192, 576)])
def test_gguf_blocks_decode_to_gguf_weights_and_multiply_as_float32(kind: str, rows: int, cols: int, amx: bool) -> None:
    """80 rows: five groups of 16, one past a full tile of four; products at 1 to 70 rows cross the row tiles (6 rows
    in registers with multiply-adds, 16 a tile on AMX, 64 a chunk)."""
    blocks = random_blocks(kind, rows, cols, seed=rows + cols)
    code = {"Q4_1": 2, "Q8_0": 8}[kind]
    packed = native.gguf_pack(code, blocks, cols)
    weight = gguf_decoded(kind, blocks, cols)
    assert torch.equal(native.gguf_rows(code, packed, rows, cols, torch.arange(rows)), weight)
    ids = torch.tensor([rows - 1, 0, rows // 2, 0])
    assert torch.equal(native.gguf_rows(code, packed, rows, cols, ids), weight[ids])
    gen = torch.Generator().manual_seed(1)
    for count in (1, 2, 5, 6, 7, 13, 16, 17, 70):
        x = torch.randn(count, cols + 8, generator=gen)[:, 3 : 3 + cols]  # strided rows, as slices of wider tensors
        got = native.gguf_linear(code, packed, rows, cols, x, amx=amx)
        want = x.double() @ weight.double().T
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * cols**0.5)


@pytest.mark.parametrize("amx", AMX_PATHS, ids=lambda amx: "amx" if amx else "fma")
def test_gguf_linear_rows_do_not_depend_on_their_batch(amx: bool) -> None:
    """Each path sums every output in one order: the same bits alone, in a batch of 70 (two row chunks), on one
    thread or two."""
    blocks, cols = random_blocks("Q4_1", 64, 128, seed=3), 128
    packed = native.gguf_pack(2, blocks, cols)
    x = torch.randn(70, cols, generator=torch.Generator().manual_seed(2))
    batched = native.gguf_linear(2, packed, 64, cols, x, amx=amx)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for row in (0, 5, 63, 64, 69):
                assert torch.equal(native.gguf_linear(2, packed, 64, cols, x[row : row + 1], amx=amx)[0], batched[row])
    finally:
        torch.set_num_threads(threads)


def test_gguf_linear_takes_amx_from_a_batch_of_gguf_amx_rows() -> None:
    """Left to choose, small batches take the multiply-adds and larger ones AMX (where the CPU has it)."""
    blocks, cols = random_blocks("Q8_0", 32, 64, seed=4), 64
    packed = native.gguf_pack(8, blocks, cols)
    x = torch.randn(native.GGUF_AMX_ROWS, cols, generator=torch.Generator().manual_seed(5))
    small, large = x[: native.GGUF_AMX_ROWS - 1], x
    assert torch.equal(
        native.gguf_linear(8, packed, 32, cols, small), native.gguf_linear(8, packed, 32, cols, small, amx=False)
    )
    want = native.gguf_linear(8, packed, 32, cols, large, amx=native.gguf_amx())
    assert torch.equal(native.gguf_linear(8, packed, 32, cols, large), want)


def test_a_failed_build_warns_and_says_why(tmp_path: Path) -> None:
    """A compiler that fails (here `false`) leaves the torch paths, with a warning and a reason for the model card."""
    code = (
        "import logging, sys; from pathlib import Path; import torch; from worker import native;"
        "logging.basicConfig(level=logging.INFO); native.use_cache_dir(Path(sys.argv[1]));"
        "print(native.status(torch.device('cpu')), native.status(torch.device('meta')))"
    )
    env = {**BARE_ENV, "CC": "false"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(False, 'false failed to build them: exit status 1') (None, '')"
    assert "WARNING:tokenmill.native:native CPU kernels off, torch paths only" in out.stderr
    assert not list((tmp_path / "native").glob("*.so"))


needs_bf16_linear = pytest.mark.skipif(
    not native.bf16_linear_ready(), reason="the kernels were built without AVX-512 BF16"
)


@needs_bf16_linear
@pytest.mark.parametrize(("rows", "cols"), [(16, 2), (151, 64), (1000, 896)])
def test_bf16_linear_rounds_float32_sums_once_and_reads_its_rows_back(rows: int, cols: int) -> None:
    """Each output is the float32 product rounded once to bfloat16 (within a unit of that rounding: the sums run in
    another order), whatever the batch; the packed rows read back bit for bit. 151 rows leave a group of 16 short and
    an odd number of groups."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=gen).bfloat16()
    packed = native.bf16_pack(weight)
    assert torch.equal(native.bf16_rows(packed, rows, cols, torch.arange(rows).flip(0)), weight.flip(0))
    x = torch.randn(13, cols, generator=gen).bfloat16()
    got = native.bf16_linear(packed, rows, cols, x)
    exact = F.linear(x.float(), weight.float())
    unit = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)
    assert bool(((got.float() - exact).abs() <= unit).all())
    assert (got == exact.bfloat16()).float().mean() > 0.99
    for r in (0, 5, 6, 12):  # alone, last of a tile of 6, first of the next, last of a short tile
        assert torch.equal(native.bf16_linear(packed, rows, cols, x[r : r + 1]), got[r : r + 1])


@needs_bf16_linear
def test_bf16_wrappers_refuse_what_the_kernel_would_misread() -> None:
    weight = torch.randn(20, 8).bfloat16()
    packed = native.bf16_pack(weight)
    with pytest.raises(IndexError, match="bf16_rows: row id 20 outside"):
        native.bf16_rows(packed, 20, 8, torch.tensor([3, 20]))
    with pytest.raises(ValueError, match="bf16_linear"):
        native.bf16_linear(packed, 20, 8, torch.zeros(2, 8))  # float32 x
    with pytest.raises(ValueError, match="bf16_linear"):
        native.bf16_linear(packed[:-1], 20, 8, torch.zeros(2, 8).bfloat16())
    with pytest.raises(ValueError, match="bf16_pack"):
        native.bf16_pack(torch.zeros(4, 7).bfloat16())  # an odd column count has no pairs


def test_status_of_loaded_kernels() -> None:
    assert native.status(torch.device("cpu")) == (True, "")
    assert native.status(torch.device("meta")) == (None, "")  # not a CPU model: the kernels do not apply


def test_wrappers_refuse_inputs_the_kernels_would_misread() -> None:
    """Shapes, dtypes and layouts the C code would read as something else raise before any pointer is passed."""
    qkv = torch.zeros(3, 4, 32)
    cos = sin = torch.zeros(3, 32)
    cache = torch.zeros(1, 2, 4, 32)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="rope_store: inputs it does not take"):
        native.rope_store(qkv, cos, sin, 2, 1, cache, cache.clone(), slots.int())  # int32 slots
    with pytest.raises(ValueError, match="rope_store"):
        native.rope_store(qkv, cos, sin, 2, 1, cache, cache.clone(), slots[:2])  # a slot short
    with pytest.raises(ValueError, match="rope_store"):
        native.rope_store(qkv, cos, sin, 3, 1, cache, cache.clone(), slots)  # heads do not add up
    with pytest.raises(ValueError, match="rope_store"):
        native.rope_store(qkv, cos[:2], sin, 2, 1, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="rope_store"):
        native.rope_store(qkv, cos, sin, 2, 1, cache, torch.zeros(1, 2, 4, 32).bfloat16(), slots)
    with pytest.raises(ValueError, match="add_rms_norm"):
        native.add_rms_norm(torch.zeros(2, 32), None, torch.zeros(16), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        native.add_rms_norm(torch.zeros(2, 32), torch.zeros(1, 32), torch.zeros(32), 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        native.silu_mul(torch.zeros(2, 64).t())
    k = torch.zeros(1, 4, 4, 16)
    with pytest.raises(ValueError, match="decode_attention"):
        native.decode_attention(
            torch.zeros(2, 1, 16), k, k, torch.zeros(1, 1, dtype=torch.long), torch.ones(2).long(), 1.0
        )
    packed = native.gguf_pack(8, random_blocks("Q8_0", 16, 32, seed=1), 32)
    with pytest.raises(ValueError, match="gguf_linear"):
        native.gguf_linear(8, packed, 16, 32, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="gguf_rows"):
        native.gguf_rows(8, packed[:-1], 16, 32, torch.tensor([0]))
    with pytest.raises(ValueError, match="gguf_pack"):
        native.gguf_pack(8, random_blocks("Q8_0", 16, 64, seed=1), 32)

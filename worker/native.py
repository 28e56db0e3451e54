"""Kernels in C (csrc/) for what torch's ops do poorly here, built on first use with the system's C compiler.

`decode_attention` attends decode rows straight from the paged cache. The torch path
gathers every sequence's blocks into a fresh tensor per layer and multiplies: at 32 decodes of 200 tokens that is
three passes over the keys and values, and half the step. The kernel reads each cached row once; it takes half the
time (SmolLM2's shapes, bfloat16, one thread).

`add_rms_norm`, `rope_store` and `silu_mul` do the elementwise parts of a Llama layer in one pass each: at batch 1
the forward ran about 25 small torch ops a layer for them, each a few microseconds of dispatch.

`gguf_linear` multiplies by weights kept as a GGUF file's Q4_1 or Q8_0 blocks, decoded in registers to the
float32 weights transformers would load (see gguf_weights.py): a third of bfloat16's bytes to read a step. Batches of
32 rows and more take AMX tiles where the CPU has them (bfloat16 products, exact here: gguf_amx.c says why).

`prefill_attention` attends a prompt's rows (a whole prompt, or a chunk of one over what earlier chunks cached)
straight from the paged cache in bfloat16, with the CPU's bfloat16 dot products (AVX-512 BF16): 2.5-3x torch's
CPU flash kernel (SDPA) on SmolLM2's and Llama-3.2-1B's shapes, where attention was over half of a 2,048-token
prefill step. It rounds as that kernel does (probabilities to bfloat16 before the values, float32 sums), not
bitwise alike: results differ from SDPA's in the last bit of a third of the outputs, as SDPA's own paths differ.

`bf16_linear` computes the output head in bfloat16 from one packed copy of its weight, which `bf16_rows` also
reads for the embedding lookup when the head is tied: at decode batch sizes F.linear's reorder on every call
doubled the head's time (bf16_linear.c says more).

`argmax` finds the greedy token of each row in a tenth of the time torch's CPU argmax takes.

`worker.native_build` compiles and loads the library; where it cannot, these wrappers are not called (the `*_takes`
functions say no) and the torch paths run.

The kernels trust the pointers they are given, so each wrapper checks shapes, dtypes and layouts first, and the
kernels check every index they follow (slots, block ids, row ids) before writing anything: a wrong table from the
block manager raises IndexError instead of reading or writing outside the cache.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from worker.native_build import bind as bind
from worker.native_build import cache_dir as cache_dir
from worker.native_build import library as library
from worker.native_build import status as status
from worker.native_build import use_cache_dir as use_cache_dir

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
GGUF_CODES = {2: 20, 8: 34}  # the GGUF types the block kernels take (Q4_1, Q8_0): bytes of a block of 32 weights
MAX_HEAD_DIM = 512  # MAX_D in csrc/attention.c
PREFILL_HEAD_DIMS = (64, 128)  # the head sizes csrc/prefill_attention.c is unrolled for
OUT_OF_RANGE = 3  # a kernel's status for an index outside what it indexes (nothing written)
# Rows of x from which gguf_linear takes the AMX path. On one weight kept in cache AMX wins from 8 rows (72 against
# 91 ns a group of 16 outputs and block of 32 columns; 170 against 247 at 32 rows), but in the model, where each step
# streams the weights from memory, it lost at 8 rows (19.8 against 16.2 ms a step of SmolLM2, steps alternating),
# tied at 16 and 24, and won at 32 (42.6 against 46.8 ms) and in prefill (8 prompts of 200 tokens: 1.98 against 2.25 s).
GGUF_AMX_ROWS = 32


def _shape_error(kernel: str, **tensors: torch.Tensor | None) -> ValueError:
    described = ", ".join(
        f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}{'' if t.is_contiguous() else ' strided'}"
        for name, t in tensors.items()
        if t is not None
    )
    return ValueError(f"{kernel}: inputs it does not take: {described}")


def _out_of_range(kernel: str, what: str, values: torch.Tensor, limit: int) -> IndexError:
    bad = values[(values < 0) | (values >= limit)]
    first = int(bad[0]) if bad.numel() else "?"
    return IndexError(f"{kernel}: {what} {first} outside [0, {limit}); nothing was written")


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a float32 matrix, the same indices (first of ties, NaN as the largest). torch's CPU
    argmax took 4.3 ms over 32 rows of a 49,152-token vocabulary, ten times its own amax; this takes about amax's."""
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        return x.argmax(dim=-1)
    lib = library()
    if lib is None or x.shape[1] == 0 or x.shape[1] >= 2**31:
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def gguf_takes(rows: int, cols: int) -> bool:
    """Whether the GGUF block kernels run for a weight [rows, cols]."""
    return rows % 16 == 0 and cols % 32 == 0 and library() is not None


def _packed_ok(lib: ctypes.CDLL, code: int, packed: torch.Tensor, rows: int, cols: int) -> bool:
    return (
        code in GGUF_CODES
        and rows % 16 == 0
        and cols % 32 == 0
        and packed.dtype == torch.uint8
        and packed.is_contiguous()
        and packed.is_cpu
        and packed.numel() == lib.gguf_packed_size(code, rows, cols)
    )


def gguf_pack(code: int, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """GGUF blocks uint8 [rows, cols / 32 * block bytes], row by row, reordered for `gguf_linear`."""
    lib = library()
    assert lib is not None
    blocks = blocks.contiguous()
    row_bytes = cols // 32 * GGUF_CODES.get(code, 0)
    if not (code in GGUF_CODES and cols % 32 == 0 and blocks.dtype == torch.uint8 and blocks.dim() == 2):
        raise _shape_error("gguf_pack", blocks=blocks)
    if blocks.shape[0] % 16 != 0 or blocks.shape[1] != row_bytes or not blocks.is_cpu:
        raise _shape_error("gguf_pack", blocks=blocks)
    out = torch.empty(lib.gguf_packed_size(code, blocks.shape[0], cols), dtype=torch.uint8)
    lib.gguf_pack(code, blocks.data_ptr(), blocks.shape[0], cols, out.data_ptr())
    return out


@functools.cache
def gguf_amx() -> bool:
    """Whether `gguf_linear` runs on AMX here: built for a CPU with AMX-BF16, and the OS grants this process the
    tile state (Linux 5.16 or later)."""
    lib = library()
    return lib is not None and bool(lib.gguf_amx_ready())


def gguf_linear(
    code: int, packed: torch.Tensor, rows: int, cols: int, x: torch.Tensor, amx: bool | None = None
) -> torch.Tensor:
    """x [T, cols] float32 (unit column stride) @ W.T -> [T, rows], W the packed blocks' float32 weights, in float32:
    with AVX-512 multiply-adds, or on AMX (`amx` True; None: where there is AMX and T >= GGUF_AMX_ROWS)."""
    lib = library()
    assert lib is not None
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != cols or not x.is_cpu:
        raise _shape_error("gguf_linear", x=x, packed=packed)
    if not _packed_ok(lib, code, packed, rows, cols):
        raise _shape_error("gguf_linear", x=x, packed=packed)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], rows)
    count, stride = x.shape[0], x.stride(0)
    tiles = gguf_amx() and count >= GGUF_AMX_ROWS if amx is None else amx
    status = lib.gguf_linear(
        code, packed.data_ptr(), rows, cols, x.data_ptr(), stride, count, out.data_ptr(), rows, int(tiles)
    )
    if status != 0:
        raise MemoryError("gguf_linear: no memory for the row sums of x")
    return out


def gguf_rows(code: int, packed: torch.Tensor, rows: int, cols: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (int64, each < rows) of the packed weight, decoded to float32 [len(ids), cols]."""
    lib = library()
    assert lib is not None
    if ids.dim() != 1 or ids.is_floating_point() or not ids.is_cpu:
        raise _shape_error("gguf_rows", ids=ids, packed=packed)
    if not _packed_ok(lib, code, packed, rows, cols):
        raise _shape_error("gguf_rows", ids=ids, packed=packed)
    ids = ids.to(torch.long).contiguous()
    out = torch.empty(ids.shape[0], cols)
    if lib.gguf_rows(code, packed.data_ptr(), rows, cols, ids.data_ptr(), ids.shape[0], out.data_ptr()) != 0:
        raise _out_of_range("gguf_rows", "row id", ids, rows)
    return out


@functools.cache
def bf16_linear_ready() -> bool:
    """Whether `bf16_linear` runs here: the library was built with AVX-512 BF16."""
    lib = library()
    return lib is not None and bool(lib.bf16_linear_ready())


def bf16_pack(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 weight [n, k] (k even) packed for `bf16_linear` and `bf16_rows`: a new flat tensor."""
    lib = library()
    assert lib is not None
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] % 2 or not weight.is_cpu:
        raise _shape_error("bf16_pack", weight=weight)
    rows, cols = weight.shape
    out = torch.empty(lib.bf16_packed_size(rows, cols), dtype=torch.bfloat16)
    lib.bf16_pack(weight.contiguous().data_ptr(), rows, cols, out.data_ptr())
    return out


def _bf16_packed_ok(lib: ctypes.CDLL, packed: torch.Tensor, rows: int, cols: int) -> bool:
    return (
        packed.dtype == torch.bfloat16
        and packed.is_cpu
        and packed.is_contiguous()
        and cols % 2 == 0
        and packed.numel() == lib.bf16_packed_size(rows, cols)
    )


def bf16_linear(
    packed: torch.Tensor, rows: int, cols: int, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, cols] bfloat16 @ W.T + bias -> [T, rows] bfloat16, W the weight `bf16_pack` packed: float32 sums and
    the bias rounded once."""
    lib = library()
    assert lib is not None and bf16_linear_ready()
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != cols or not x.is_cpu:
        raise _shape_error("bf16_linear", x=x, packed=packed, bias=bias)
    if not _bf16_packed_ok(lib, packed, rows, cols) or not (bias is None or _dense(bias, torch.bfloat16, (rows,))):
        raise _shape_error("bf16_linear", x=x, packed=packed, bias=bias)
    x = x.contiguous()
    out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
    extra = None if bias is None else bias.data_ptr()
    lib.bf16_linear(x.data_ptr(), packed.data_ptr(), extra, out.data_ptr(), x.shape[0], rows, cols)
    return out


def bf16_rows(packed: torch.Tensor, rows: int, cols: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (each in [0, rows)) of the weight `bf16_pack` packed: [len(ids), cols] bfloat16, bit for bit."""
    lib = library()
    assert lib is not None
    if ids.dim() != 1 or ids.is_floating_point() or not ids.is_cpu:
        raise _shape_error("bf16_rows", ids=ids, packed=packed)
    if not _bf16_packed_ok(lib, packed, rows, cols):
        raise _shape_error("bf16_rows", ids=ids, packed=packed)
    ids = ids.to(torch.long).contiguous()
    out = torch.empty(ids.shape[0], cols, dtype=torch.bfloat16)
    if lib.bf16_rows(packed.data_ptr(), rows, cols, ids.data_ptr(), ids.shape[0], out.data_ptr()) != 0:
        raise _out_of_range("bf16_rows", "row id", ids, rows)
    return out


def layer_ops_take(dtype: torch.dtype, device: torch.device, hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether the layer kernels run for a model of these sizes in `dtype` on `device`."""
    sizes = hidden % 16 == 0 and intermediate % 16 == 0 and head_dim % 32 == 0
    return sizes and device.type == "cpu" and dtype in DTYPE_CODES and library() is not None


def _dense(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """A contiguous CPU tensor of this dtype and shape: what the layer kernels read and write as flat rows."""
    return t.is_cpu and t.dtype == dtype and t.shape == shape and t.is_contiguous()


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden += delta in place (when given); returns RMSNorm(hidden) * weight. All [T, C] contiguous."""
    lib = library()
    assert lib is not None
    shape, dtype = hidden.shape, hidden.dtype
    ok = dtype in DTYPE_CODES and hidden.dim() == 2 and shape[1] % 16 == 0 and _dense(hidden, dtype, shape)
    if not (ok and _dense(weight, dtype, shape[1:]) and (delta is None or _dense(delta, dtype, shape))):
        raise _shape_error("add_rms_norm", hidden=hidden, delta=delta, weight=weight)
    normed = torch.empty_like(hidden)
    rows, cols = shape
    extra = delta.data_ptr() if delta is not None else None
    lib.add_rms_norm(
        DTYPE_CODES[dtype], hidden.data_ptr(), extra, weight.data_ptr(), normed.data_ptr(), rows, cols, eps
    )
    return normed


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """qkv [T, H + 2 Hkv, D] (rows contiguous): rotary on q and k in place; k and v to the caches at `slots`.
    cos, sin [T, D] contiguous; caches [Hkv, blocks, block_size, D] contiguous; slots [T] int64, each in
    [0, blocks * block_size) (IndexError, nothing written, otherwise)."""
    lib = library()
    assert lib is not None
    rows, width, head_dim = qkv.shape
    dtype, cache_shape = qkv.dtype, k_cache.shape
    row_stride, head_stride, dim_stride = qkv.stride()
    ok = dtype in DTYPE_CODES and width == heads + 2 * kv_heads and head_dim % 32 == 0 and qkv.is_cpu
    ok = ok and dim_stride == 1 and head_stride == head_dim and _dense(cos, dtype, (rows, head_dim))
    ok = ok and _dense(sin, dtype, (rows, head_dim)) and len(cache_shape) == 4 and cache_shape[0] == kv_heads
    ok = (
        ok
        and cache_shape[3] == head_dim
        and _dense(k_cache, dtype, cache_shape)
        and _dense(v_cache, dtype, cache_shape)
    )
    if not (ok and _dense(slots, torch.long, (rows,))):
        raise _shape_error("rope_store", qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slots=slots)
    cache_slots = cache_shape[1] * cache_shape[2]
    status = lib.rope_store(
        DTYPE_CODES[dtype],
        qkv.data_ptr(),
        row_stride,
        cos.data_ptr(),
        sin.data_ptr(),
        rows,
        heads,
        kv_heads,
        head_dim,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        cache_slots,
        slots.data_ptr(),
    )
    if status != 0:
        raise _out_of_range("rope_store", "KV slot", slots, cache_slots)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate, then up) -> silu(gate) * up [T, I]."""
    lib = library()
    assert lib is not None
    if gate_up.dim() != 2 or gate_up.shape[1] % 32 != 0 or gate_up.dtype not in DTYPE_CODES:
        raise _shape_error("silu_mul", gate_up=gate_up)
    if not _dense(gate_up, gate_up.dtype, gate_up.shape):
        raise _shape_error("silu_mul", gate_up=gate_up)
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    lib.silu_mul(DTYPE_CODES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def decode_attention_takes(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `decode_attention` runs for a model of these shapes, its cache in `dtype` on `device`."""
    shapes = heads % kv_heads == 0 and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM
    return shapes and device.type == "cpu" and dtype in DTYPE_CODES and library() is not None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """q [B, H, D] (head rows contiguous), caches [Hkv, blocks, block_size, D], tables [B, max_blocks] and lengths
    [B] int64 -> [B, H, D]; None when the kernel does not take these shapes. Each length must lie in
    [1, max_blocks * block_size] and the table entries it covers in [0, blocks): IndexError otherwise."""
    lib = library()
    code = DTYPE_CODES.get(q.dtype)
    if lib is None or code is None or q.dim() != 3 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    row_stride, head_stride, dim_stride = q.stride()
    if k_cache.dtype != q.dtype or block_tables.dtype != torch.long or lengths.dtype != torch.long:
        return None
    if dim_stride != 1 or not q.is_cpu or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return None
    batch, heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, cache_dim = k_cache.shape
    if v_cache.dtype != q.dtype or cache_dim != head_dim or not (k_cache.is_cpu and v_cache.is_cpu):
        return None
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or lengths.shape != (batch,):
        raise _shape_error("decode_attention", q=q, block_tables=block_tables, lengths=lengths)
    tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype)
    status = lib.decode_attention(
        code,
        q.data_ptr(),
        row_stride,
        head_stride,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        lengths.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        num_blocks,
        block_size,
        scale,
    )
    if status == OUT_OF_RANGE:
        raise _table_error(tables, lengths, num_blocks, block_size)
    if status == 2:
        raise MemoryError("decode_attention: no memory for the scores")
    return out if status == 0 else None


def prefill_attention_takes(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `prefill_attention` runs for a model of these shapes: a bfloat16 cache on a CPU with AVX-512 BF16."""
    if device.type != "cpu" or dtype != torch.bfloat16 or heads % kv_heads or head_dim not in PREFILL_HEAD_DIMS:
        return False
    lib = library()
    return lib is not None and bool(lib.prefill_attention_ready())


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    ctx_len: int,
    out: torch.Tensor,
    scale: float,
) -> bool:
    """Causal attention of one request's query rows q [H, q_len, D] over its first `ctx_len` cached tokens (the
    rows' own among them, the last q_len), the caches [Hkv, blocks, block_size, D] and `table` [n] int64 its block
    ids. Writes out [q_len, H, D] (heads contiguous); False, nothing written, for shapes it does not take. A block id
    outside the cache, or a context longer than the table covers, raises IndexError."""
    lib = library()
    if lib is None or q.dtype != torch.bfloat16 or q.dim() != 3 or out.dim() != 3 or table.dtype != torch.long:
        return False
    heads, q_len, head_dim = q.shape
    if q.stride(2) != 1 or out.shape != (q_len, heads, head_dim) or out.stride()[1:] != (head_dim, 1):
        return False
    if not all(t.is_cpu and t.dtype == q.dtype and t.is_contiguous() for t in (k_cache, v_cache, out[0])):
        return False
    kv_heads, num_blocks, block_size, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_dim != head_dim or not table.is_contiguous():
        return False
    status = lib.prefill_attention(
        q.data_ptr(),
        q.stride(1),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        table.data_ptr(),
        table.numel(),
        ctx_len,
        q_len,
        out.data_ptr(),
        out.stride(0),
        heads,
        kv_heads,
        head_dim,
        num_blocks,
        block_size,
        scale,
    )
    if status == OUT_OF_RANGE:
        if ctx_len > table.numel() * block_size:
            raise IndexError(f"prefill_attention: context {ctx_len} longer than the table's {table.numel()} blocks")
        raise _out_of_range("prefill_attention", "block id", table[: -(-ctx_len // block_size)], num_blocks)
    if status == 2:
        raise MemoryError("prefill_attention: no memory for the packed keys and values")
    return int(status) == 0


def _table_error(tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int) -> IndexError:
    """What `decode_attention` found out of range, for the message (the slow path of a bug)."""
    longest = tables.shape[1] * block_size
    if bool(((lengths < 1) | (lengths > longest)).any()):
        bad = lengths[(lengths < 1) | (lengths > longest)]
        return IndexError(f"decode_attention: length {int(bad[0])} outside [1, {longest}] (the table's width)")
    used = torch.arange(tables.shape[1]) < ((lengths + block_size - 1) // block_size)[:, None]
    return _out_of_range("decode_attention", "block id", tables[used], num_blocks)

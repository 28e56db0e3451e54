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

`argmax` finds the greedy token of each row in a tenth of the time torch's CPU argmax takes.

The shared library is compiled for this CPU (`-march=native`) into the cache directory, keyed by the source, the
compiler and the CPU, so one build serves every later start (under a second). Where there is no compiler, no
AVX-512, or `TOKENMILL_NATIVE=0`, nothing is built and the torch paths run; the log says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("tokenmill.native")

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
# OpenMP splits the kernel over torch's threads: the library resolves libgomp to the copy torch has loaded, so
# both share one thread pool. A compiler without OpenMP builds it single-threaded.
OPENMP = ["-fopenmp"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_HEAD_DIM = 512  # MAX_D in csrc/attention.c
# Rows of x from which gguf_linear takes the AMX path. On one weight kept in cache AMX wins from 8 rows (72 against
# 91 ns a group of 16 outputs and block of 32 columns; 170 against 247 at 32 rows), but in the model, where each step
# streams the weights from memory, it lost at 8 rows (19.8 against 16.2 ms a step of SmolLM2, steps alternating),
# tied at 16 and 24, and won at 32 (42.6 against 46.8 ms) and in prefill (8 prompts of 200 tokens: 1.98 against 2.25 s).
GGUF_AMX_ROWS = 32


def cache_dir() -> Path:
    """Beside the converted weights: the server's cache directory (`TOKENMILL_CACHE_DIR`) or ~/.cache/tokenmill."""
    return Path(os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill") / "native"


@functools.cache
def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return flags


def _has_avx512() -> bool:
    return "avx512f" in _cpu_key().split()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in SOURCES + HEADERS]
    digest = hashlib.sha256("\0".join([*texts, " ".join(FLAGS + OPENMP), version, _cpu_key()]).encode())
    target = cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, "-o", str(built), *map(str, SOURCES)]
        try:
            subprocess.run([*command, *OPENMP], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: workers starting together never load a half-written file
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (and a log line saying why) where they cannot run."""
    if os.environ.get("TOKENMILL_NATIVE", "1") == "0":
        log.info("native kernels off (TOKENMILL_NATIVE=0): torch paths only")
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not _has_avx512():
        log.info("native kernels need an x86 CPU with AVX-512: torch paths only")
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler (cc, gcc, clang or $CC): native kernels off, torch paths only")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        log.warning("native kernels failed to build or load, torch paths only: %s", detail)
        return None
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention.argtypes = [
        ctypes.c_int,  # dtype
        ctypes.c_void_p,  # q
        ctypes.c_int64,  # q row stride
        ctypes.c_int64,  # q head stride
        ctypes.c_void_p,  # k cache
        ctypes.c_void_p,  # v cache
        ctypes.c_void_p,  # block tables
        ctypes.c_int64,  # max blocks
        ctypes.c_void_p,  # lengths
        ctypes.c_void_p,  # out
        ctypes.c_int,  # B
        ctypes.c_int,  # H
        ctypes.c_int,  # Hkv
        ctypes.c_int,  # D
        ctypes.c_int64,  # num blocks
        ctypes.c_int,  # block size
        ctypes.c_float,  # scale
    ]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.add_rms_norm.restype = None
    lib.add_rms_norm.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.rope_store.restype = None
    lib.rope_store.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.rope_store.argtypes += [ptr, ptr, i64, ptr]
    lib.silu_mul.restype = None
    lib.silu_mul.argtypes = [ctypes.c_int, ptr, ptr, i64, i64]
    lib.gguf_packed_size.restype = i64
    lib.gguf_packed_size.argtypes = [ctypes.c_int, i64, i64]
    lib.gguf_pack.restype = None
    lib.gguf_pack.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.gguf_linear.restype = ctypes.c_int
    lib.gguf_linear.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.gguf_amx_ready.restype = ctypes.c_int
    lib.gguf_amx_ready.argtypes = []
    lib.gguf_rows.restype = None
    lib.gguf_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.argmax_rows.restype = None
    lib.argmax_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a float32 matrix, the same indices (first of ties, NaN as the largest). torch's CPU
    argmax took 4.3 ms over 32 rows of a 49,152-token vocabulary, ten times its own amax; this takes about amax's."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1:
        return x.argmax(dim=-1)
    if x.shape[1] == 0 or x.shape[1] >= 2**31:
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def gguf_takes(rows: int, cols: int) -> bool:
    """Whether the GGUF block kernels run for a weight [rows, cols]."""
    return rows % 16 == 0 and cols % 32 == 0 and library() is not None


def gguf_pack(code: int, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """GGUF blocks uint8 [rows, cols / 32 * block bytes], row by row, reordered for `gguf_linear`."""
    lib = library()
    assert lib is not None
    blocks = blocks.contiguous()
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
    assert lib is not None and x.dtype == torch.float32 and x.dim() == 2
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
    ids = ids.to(torch.long).contiguous()
    out = torch.empty(ids.shape[0], cols)
    lib.gguf_rows(code, packed.data_ptr(), rows, cols, ids.data_ptr(), ids.shape[0], out.data_ptr())
    return out


def layer_ops_take(dtype: torch.dtype, device: torch.device, hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether the layer kernels run for a model of these sizes in `dtype` on `device`."""
    sizes = hidden % 16 == 0 and intermediate % 16 == 0 and head_dim % 32 == 0
    return sizes and device.type == "cpu" and dtype in DTYPE_CODES and library() is not None


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden += delta in place (when given); returns RMSNorm(hidden) * weight. All [T, C] contiguous."""
    lib = library()
    assert lib is not None
    normed = torch.empty_like(hidden)
    rows, cols = hidden.shape
    extra = delta.data_ptr() if delta is not None else None
    lib.add_rms_norm(
        DTYPE_CODES[hidden.dtype], hidden.data_ptr(), extra, weight.data_ptr(), normed.data_ptr(), rows, cols, eps
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
    cos, sin [T, D] contiguous; caches [Hkv, blocks, block_size, D] contiguous."""
    lib = library()
    assert lib is not None
    rows, _, head_dim = qkv.shape
    cache_slots = k_cache.shape[1] * k_cache.shape[2]
    lib.rope_store(
        DTYPE_CODES[qkv.dtype],
        qkv.data_ptr(),
        qkv.stride(0),
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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate, then up) -> silu(gate) * up [T, I]."""
    lib = library()
    assert lib is not None
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
    [B] int64 -> [B, H, D]; None when the kernel does not take these shapes."""
    lib = library()
    code = DTYPE_CODES.get(q.dtype)
    if lib is None or code is None or q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    if k_cache.dtype != q.dtype or block_tables.dtype != torch.long or lengths.dtype != torch.long:
        return None
    batch, heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _ = k_cache.shape
    tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype)
    status = lib.decode_attention(
        code,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
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
    return out if status == 0 else None

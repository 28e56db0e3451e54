"""Builds and loads the C kernels of `worker.native`.

A prebuilt library comes first: `python -m worker.native_build --prebuild` compiles the kernels once for each of
a few x86-64 levels (`VARIANTS`: x86-64-v4, that is AVX-512 F/BW/CD/DQ/VL over AVX2/FMA/F16C/BMI2; then with
AVX-512 BF16; then with AMX-BF16 too) into `worker/prebuilt/` beside the sources, as the CPU image does at build
time, so a container's first start needs no compiler. At start the best variant whose CPU flags this machine has is
loaded, if it was built from these very sources. Otherwise the kernels are compiled for this CPU (`-march=native`)
with the system's C compiler into the server's cache directory (`--cache-dir`, through `use_cache_dir`), keyed by
the sources, the compiler and the CPU, so one build serves every later start (under a second).

Where there is no prebuilt variant for this CPU and no compiler, no AVX-512, a failed build, or
`TOKENMILL_NATIVE=0`, nothing is loaded and the torch paths run, about half as fast on a CPU: a warning says why,
and so does the model's card (`status`). The start-up log names the library and which kernels it runs.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("tokenmill.native")

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
# OpenMP splits the kernel over torch's threads: the library resolves libgomp to the copy torch has loaded, so
# both share one thread pool. A compiler without OpenMP builds it single-threaded.
OPENMP = ["-fopenmp"]
PREBUILT = Path(__file__).parent / "prebuilt"
# x86-64-v4 in /proc/cpuinfo's names: v2 and v3 (SSE4.2, POPCNT, AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE, XSAVE) and
# AVX-512 F, BW, CD, DQ and VL.
X86_64_V4 = frozenset(
    {
        *("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma"),
        *("abm", "movbe", "xsave", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    }
)


@dataclass(frozen=True)
class Variant:
    """One prebuilt library: the compiler's target flags (in place of -march=native) and the CPU flags it needs."""

    name: str
    target: tuple[str, ...]
    needs: frozenset[str]

    def path(self, directory: Path) -> Path:
        return directory / f"kernels-{self.name}-{_sources_digest()}.so"


# best first: the bf16 prefill attention needs AVX-512 BF16, the GGUF AMX path AMX-BF16; the rest runs on plain v4
VARIANTS = (
    Variant(
        "v4-bf16-amx",
        ("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
        X86_64_V4 | {"avx512_bf16", "amx_tile", "amx_bf16"},
    ),
    Variant("v4-bf16", ("-march=x86-64-v4", "-mavx512bf16"), X86_64_V4 | {"avx512_bf16"}),
    Variant("v4", ("-march=x86-64-v4",), X86_64_V4),
)
_cache_root: Path | None = None
_unavailable = ""  # why `library()` returned None


def use_cache_dir(root: Path) -> None:
    """Build into (and load from) `root`/native: the server's cache directory. Call before the first `library()`."""
    global _cache_root
    _cache_root = root


def cache_dir() -> Path:
    """Beside the converted weights: the server's cache directory, or ~/.cache/tokenmill until one is set."""
    return (_cache_root or Path.home() / ".cache" / "tokenmill") / "native"


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


def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpu_key().split())


@functools.cache
def _sources_digest() -> str:
    """What a prebuilt library was built from: the sources and the flags other than the target's."""
    texts = [path.read_text() for path in SOURCES + HEADERS]
    flags = [flag for flag in FLAGS + OPENMP if not flag.startswith("-march")]
    return hashlib.sha256("\0".join([*texts, " ".join(flags)]).encode()).hexdigest()[:16]


def prebuilt(directory: Path = PREBUILT, flags: frozenset[str] | None = None) -> tuple[Variant, Path] | None:
    """The best prebuilt variant in `directory` that this CPU (or one with `flags`) runs, built from these sources."""
    have = _cpu_flags() if flags is None else flags
    for variant in VARIANTS:
        path = variant.path(directory)
        if variant.needs <= have and path.exists():
            return variant, path
    return None


def prebuild(
    directory: Path = PREBUILT, compiler: str | None = None, variants: tuple[Variant, ...] = VARIANTS
) -> list[Path]:
    """Compile the variants into `directory` (any CPU may build them: nothing runs). Returns their paths."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc, clang or $CC) to build the kernels")
    flags = [flag for flag in FLAGS if not flag.startswith("-march")]
    return [_compile(compiler, [*flags, *variant.target], variant.path(directory)) for variant in variants]


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
    return _compile(compiler, FLAGS, target)


def _compile(compiler: str, flags: list[str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *flags, "-o", str(built), *map(str, SOURCES)]
        try:
            subprocess.run([*command, *OPENMP], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: workers starting together never load a half-written file
    return target


def _off(reason: str, level: int = logging.WARNING) -> None:
    global _unavailable
    _unavailable = reason
    log.log(level, "native CPU kernels off, torch paths only (about half as fast): %s", reason)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (and a warning saying why) where they cannot run."""
    if os.environ.get("TOKENMILL_NATIVE", "1") == "0":
        _off("switched off (TOKENMILL_NATIVE=0)", logging.INFO)
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not _has_avx512():
        _off(f"they need an x86 CPU with AVX-512, and this is {platform.machine()} without it")
        return None
    found = prebuilt()
    if found is not None:
        variant, path = found
        try:
            lib = bind(ctypes.CDLL(str(path)))
        except OSError as exc:
            log.warning("the prebuilt kernels %s did not load (%s); building them for this CPU", path, exc)
        else:
            log.info("native CPU kernels: prebuilt for %s, from %s; %s", variant.name, path, kernels(lib))
            return lib
    compiler = _compiler()
    if compiler is None:
        _off("no C compiler (cc, gcc, clang or $CC) to build them, and none prebuilt for this CPU")
        return None
    try:
        path = _build(compiler)
        lib = bind(ctypes.CDLL(str(path)))
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip()[-500:] or f"exit status {exc.returncode}"
        _off(f"{compiler} failed to build them: {detail}")
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        _off(f"they failed to build or load with {compiler}: {exc}")
        return None
    log.info("native CPU kernels: built for this CPU, from %s; %s", path, kernels(lib))
    return lib


def kernels(lib: ctypes.CDLL) -> str:
    """Which kernels a loaded library runs here."""
    prefill = "bf16 prefill attention" if lib.prefill_attention_ready() else "no bf16 prefill attention (SDPA)"
    head = "bf16 packed head" if lib.bf16_linear_ready() else "no bf16 packed head"
    amx = "GGUF blocks on AMX from 32 rows" if lib.gguf_amx_ready() else "GGUF blocks on AVX-512 only"
    return f"decode attention, layer ops, sampling, {prefill}, {head}, {amx}"


def status(device: torch.device) -> tuple[bool | None, str]:
    """Whether the kernels serve a model on `device` (None: not a CPU, they do not apply), and why not."""
    if device.type != "cpu":
        return None, ""
    return library() is not None, _unavailable


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' C signatures on a loaded copy of the library."""
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
    lib.prefill_attention_ready.restype = ctypes.c_int
    lib.prefill_attention_ready.argtypes = []
    lib.prefill_attention.restype = ctypes.c_int
    # q, q row stride, q head stride, k cache, v cache, table, table length, ctx_len, q_len, out, out row stride
    lib.prefill_attention.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i64]
    # H, Hkv, D, num blocks, block size, scale
    lib.prefill_attention.argtypes += [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, ctypes.c_int, ctypes.c_float]
    lib.add_rms_norm.restype = None
    lib.add_rms_norm.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.rope_store.restype = ctypes.c_int
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
    lib.gguf_rows.restype = ctypes.c_int
    lib.gguf_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.bf16_packed_size.restype = i64
    lib.bf16_packed_size.argtypes = [i64, i64]
    lib.bf16_pack.restype = None
    lib.bf16_pack.argtypes = [ptr, i64, i64, ptr]
    lib.bf16_rows.restype = ctypes.c_int
    lib.bf16_rows.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    lib.bf16_linear_ready.restype = ctypes.c_int
    lib.bf16_linear_ready.argtypes = []
    lib.bf16_linear.restype = ctypes.c_int
    lib.bf16_linear.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.argmax_rows.restype = None
    lib.argmax_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the native CPU kernels ahead of time, for images.")
    parser.add_argument(
        "--prebuild", action="store_true", help=f"compile every variant ({', '.join(v.name for v in VARIANTS)})"
    )
    parser.add_argument("--dir", type=Path, default=PREBUILT, help="where the libraries go")
    args = parser.parse_args(argv)
    if args.prebuild:
        for path in prebuild(args.dir):
            print(path)
    found = prebuilt(args.dir)
    lib = library() if found is not None and args.dir == PREBUILT else None
    print(f"this CPU loads: {found[0].name if found else 'none of them'}" + (f"; {kernels(lib)}" if lib else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prebuilt kernels (`python -m worker.native_build --prebuild`, as the CPU image runs at build time): each CPU loads
the best variant it runs, built from the current sources, and a prebuilt library computes what the one built for
this CPU computes."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from worker import native, native_build
from worker.native_build import VARIANTS, X86_64_V4, prebuild, prebuilt

AMX = X86_64_V4 | {"avx512_bf16", "amx_tile", "amx_bf16"}


def test_each_cpu_takes_the_best_variant_it_runs_and_only_of_these_sources(tmp_path: Path) -> None:
    for variant in VARIANTS:
        variant.path(tmp_path).write_bytes(b"")
    chosen = {name: prebuilt(tmp_path, flags) for name, flags in [
        ("amx", AMX | {"avx512_vnni"}),
        ("bf16", X86_64_V4 | {"avx512_bf16", "amx_tile"}),  # AMX tiles without AMX-BF16: no AMX variant
        ("v4", X86_64_V4),
    ]}  # fmt: skip
    assert {name: found[0].name for name, found in chosen.items() if found} == {
        "amx": "v4-bf16-amx",
        "bf16": "v4-bf16",
        "v4": "v4",
    }
    assert prebuilt(tmp_path, X86_64_V4 - {"avx512bw"}) is None  # AVX2 only: none; the JIT build decides
    assert prebuilt(tmp_path / "empty", AMX) is None
    for variant in VARIANTS:  # libraries of other sources are never taken
        variant.path(tmp_path).rename(tmp_path / f"kernels-{variant.name}-0123456789abcdef.so")
    assert prebuilt(tmp_path, AMX) is None


@pytest.mark.skipif(
    native_build._compiler() is None or not native_build._has_avx512(), reason="needs a C compiler and AVX-512"
)
def test_the_prebuilt_variant_this_cpu_takes_loads_and_equals_the_native_build(tmp_path: Path) -> None:
    have = native_build._cpu_flags()
    variant = next(v for v in VARIANTS if v.needs <= have)
    [path] = prebuild(tmp_path, variants=(variant,))
    assert prebuilt(tmp_path) == (variant, path)
    lib = native_build.bind(ctypes.CDLL(str(path)))
    jit = native.library()
    assert jit is not None
    assert (
        bool(lib.prefill_attention_ready()) == ("avx512_bf16" in variant.needs) == bool(jit.prefill_attention_ready())
    )
    assert "decode attention" in native_build.kernels(lib)

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 64, generator=gen)
    k, v = torch.randn(2, 6, 16, 64, generator=gen), torch.randn(2, 6, 16, 64, generator=gen)
    tables = torch.tensor([[0, 2, 4], [1, 3, 5]] * 2)[:3].contiguous()
    lengths = torch.tensor([40, 17, 33])
    outs = []
    for library in (lib, jit):
        out = torch.empty(3, 8, 64)
        status = library.decode_attention(
            0, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), tables.data_ptr(),
            tables.shape[1], lengths.data_ptr(), out.data_ptr(), 3, 8, 2, 64, 6, 16, 0.125,
        )  # fmt: skip
        assert status == 0
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)

"""The C kernels never follow an index out of what it indexes, and a worker that cannot use them says so.

The index tests hand each kernel a cache (or weight) that is a view of the first half of a larger buffer, and an
index one past its end or below its start: unchecked, the kernel reads or writes the second half without a word,
which in the server is another layer's cache or the allocator's books. Checked, it raises IndexError and writes
nothing. The server tests start real workers: one builds the kernels into its --cache-dir and reports them on its
model card; one whose compiler fails warns, still serves, and its card says why it runs the slower torch paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_harness import Server, model_entry, start_server, write_registry
from worker import native, native_build

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no AVX-512 or no C compiler: no kernels here")


def guarded(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous tensor of `shape` and the guard region right after it in the same buffer (zeros both)."""
    count = torch.Size(shape).numel()
    buffer = torch.zeros(2 * count, dtype=dtype)
    return buffer[:count].view(shape), buffer[count:]


@needs_kernels
@pytest.mark.parametrize("slot", [16, 17, -1])
def test_rope_store_refuses_a_slot_outside_the_cache(slot: int) -> None:
    heads, kv_heads, head_dim = 2, 1, 32
    qkv = torch.randn(3, heads + 2 * kv_heads, head_dim)
    before = qkv.clone()
    cos = sin = torch.ones(3, head_dim)
    k_cache, k_guard = guarded((kv_heads, 4, 4, head_dim))  # 16 slots
    v_cache, v_guard = guarded((kv_heads, 4, 4, head_dim))
    with pytest.raises(IndexError, match=f"rope_store: KV slot {slot} outside \\[0, 16\\); nothing was written"):
        native.rope_store(qkv, cos, sin, heads, kv_heads, k_cache, v_cache, torch.tensor([0, slot, 5]))
    assert not k_guard.any() and not v_guard.any()  # nothing past the cache
    assert not k_cache.any() and not v_cache.any() and torch.equal(qkv, before)  # nor anywhere else


@needs_kernels
@pytest.mark.parametrize(("table", "length", "error"), [
    ([1, 4], 5, "block id 4 outside \\[0, 4\\)"),  # the second block is read, and is past the cache
    ([-1, 0], 3, "block id -1 outside \\[0, 4\\)"),
    ([1, 2], 9, "length 9 outside \\[1, 8\\]"),  # longer than the table: its row would run into the next one
    ([1, 2], 0, "length 0 outside \\[1, 8\\]"),
])  # fmt: skip
def test_decode_attention_refuses_a_block_it_would_read_outside_the_cache(
    table: list[int], length: int, error: str
) -> None:
    k_cache, k_guard = guarded((1, 4, 4, 16))
    v_cache, v_guard = guarded((1, 4, 4, 16))
    k_guard.fill_(1e4)  # unchecked, these would dominate the scores and the values
    v_guard.fill_(1e4)
    tables = torch.tensor([[0, 0], table])
    with pytest.raises(IndexError, match=f"decode_attention: {error}"):
        native.decode_attention(torch.ones(2, 1, 16), k_cache, v_cache, tables, torch.tensor([1, length]), 1.0)


@needs_kernels
def test_decode_attention_still_ignores_table_padding_past_a_length() -> None:
    k_cache, v_cache = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16)
    got = native.decode_attention(
        torch.ones(1, 1, 16), k_cache, v_cache, torch.tensor([[2, 10**9]]), torch.tensor([3]), 1.0
    )
    assert got is not None and torch.isfinite(got).all()


@needs_kernels
@pytest.mark.parametrize("row", [16, -1])
def test_gguf_rows_refuses_a_row_outside_the_weight(row: int) -> None:
    blocks = torch.randint(0, 256, (32, 34), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blocks.view(torch.float16)[:, 0] = 0.01  # each block's scale: a finite number
    packed = native.gguf_pack(8, blocks, 32)
    first_half = packed[: packed.numel() // 2]  # the packed rows 0..15, followed by 16..31 in the same buffer
    with pytest.raises(IndexError, match=f"gguf_rows: row id {row} outside \\[0, 16\\)"):
        native.gguf_rows(8, first_half, 16, 32, torch.tensor([0, row]))
    assert torch.equal(
        native.gguf_rows(8, first_half, 16, 32, torch.tensor([15])),
        native.gguf_rows(8, packed, 32, 32, torch.tensor([15])),
    )


# --- workers --------------------------------------------------------------------------------------------------


@contextmanager
def serve(tiny_llama_dir: Path, tmp: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Server, httpx.Client]]:
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp, "--cache-dir", str(tmp / "cache"), env=env)
    with server.client(timeout=60) as client:
        yield server, client
    assert server.stop() == 0


def card(client: httpx.Client) -> dict[str, object]:
    response = client.get("/v1/models")
    assert response.status_code == 200
    (found,) = [c for c in response.json()["data"] if c["id"] == "tiny"]
    return dict(found)


@needs_kernels
def test_the_kernels_are_built_in_the_servers_cache_dir(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with serve(tiny_llama_dir, tmp_path) as (server, client):
        built = list((tmp_path / "cache" / "native").glob("kernels-*.so"))
        assert len(built) == 1, server.log()[-3000:]
        assert f"native CPU kernels: built for this CPU, from {built[0]}; decode attention" in server.log()
        model = card(client)
        assert model["native_kernels"] is True and model.get("native_kernels_reason") is None


def test_a_worker_without_the_kernels_warns_and_says_why_on_its_card(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A compiler that fails to build them (`false`, as a broken toolchain would) is a real way to lose them."""
    with serve(tiny_llama_dir, tmp_path, env={"CC": "false"}) as (server, client):
        model = card(client)
        assert model["native_kernels"] is False
        reason = str(model["native_kernels_reason"])
        if native_build._has_avx512():  # elsewhere the reason is the missing AVX-512
            assert reason == "false failed to build them: exit status 1"
        assert (
            reason
            and f"WARNING native CPU kernels off, torch paths only (about half as fast): {reason}" in server.log()
        )
        assert not (tmp_path / "cache" / "native").exists() or not list((tmp_path / "cache" / "native").glob("*.so"))
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3

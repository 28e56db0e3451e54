"""The paged KV cache's bookkeeping: a fixed pool of blocks, ref counts, and a prefix cache of full blocks.

Pure Python (no torch): it decides which block ids a sequence's tokens live in; the model runner owns the tensors.
A full block is keyed by a chained SHA-256 digest of its parent's key and its own tokens, so equal keys mean equal
prefixes: Python's `hash()` of small ints and tuples is predictable, and a client could craft a prompt whose blocks
collide with another's and be served that other prompt's KV (vLLM's advisory GHSA-rm76-4mrf-v9r8). The chain starts
from a root that a request's `cache_salt` changes, so requests of different salts never share a block, nor learn
from `cached_tokens` what another tenant sent. Freed blocks keep their contents and key and go to the tail of an LRU
free queue, so they can be hit again until allocation evicts them from the head.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

_ROOT = b"tokenmill prefix cache v1\0"


def root_key(cache_salt: str | None = None) -> bytes:
    """The parent key of a sequence's first block: one for unsalted requests, another for each salt."""
    salted = b"" if cache_salt is None else b"salt\0" + cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.sha256(_ROOT + salted).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # the chained key of a full block's prefix, once registered
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block key -> block id
        self._pack = struct.Struct(f"<{block_size}q").pack  # a block's tokens as little-endian int64s
        self._unsalted = root_key()

    def block_key(self, parent: bytes, tokens: Sequence[int]) -> bytes:
        """The key of a full block of `tokens` after the prefix whose last block's key is `parent`."""
        return hashlib.sha256(parent + self._pack(*tokens)).digest()

    def _root(self, cache_salt: str | None) -> bytes:
        return self._unsalted if cache_salt is None else root_key(cache_salt)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached ones included: they are evictable)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, block_table: Sequence[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def match_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """Block ids holding the longest cached run of full blocks that starts `token_ids` (registered under the same
        salt). Takes nothing."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = self._root(cache_salt)
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start : start + self.block_size])
            block_hash = self.block_key(parent, tokens)
            block_id = self.cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = block_hash
        return hits

    def take_cached(self, block_table: list[int], block_ids: Sequence[int]) -> None:
        """Append prefix-cache hits to a block table, taking a reference on each."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            block_table.append(block_id)

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` to hold `num_tokens` tokens; all or nothing. Evicts the least recently freed blocks."""
        needed = self.blocks_needed(block_table, num_tokens)
        if needed > len(self.free_queue):
            return False
        for _ in range(needed):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._forget(block)
            block.ref_count = 1
            block_table.append(block_id)
        return True

    def cache_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int, cache_salt: str | None = None
    ) -> None:
        """Register every full block among the first `num_computed` tokens that is not registered yet."""
        if not self.enable_prefix_caching:
            return
        parent = self._root(cache_salt)
        for index in range(num_computed // self.block_size):
            block = self.blocks[block_table[index]]
            if block.block_hash is None:
                start = index * self.block_size
                tokens = tuple(token_ids[start : start + self.block_size])
                block.block_hash = self.block_key(parent, tokens)
                block.token_ids = tokens
                self.cached.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Drop the blocks past the first `num_tokens` tokens' (those of proposed tokens that were not kept)."""
        keep = -(-num_tokens // self.block_size)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.free(tail)

    def free(self, block_table: list[int]) -> None:
        """Drop a sequence's references. Its last blocks go first in the eviction order (they are least shared)."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue[block_id] = None
                    self.free_queue.move_to_end(block_id, last=False)  # holds nothing reusable: evict it first
                else:
                    self.free_queue[block_id] = None
        block_table.clear()

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                self._forget(block)

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) == block.block_id:
            del self.cached[block.block_hash]
        block.block_hash = None
        block.token_ids = ()

"""The prefix cache's key of one full block: SHA-256 of the parent key and the packed tokens, against the Python
`hash()` of a tuple it replaced, per block of 16 and 256 tokens; and a 4,096-token prompt looked up whole.

    python -m loadtests.bench_block_hash [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit

from worker.block_manager import BlockManager, root_key


def per_block_us(block_size: int, repeat: int) -> tuple[float, float]:
    """(sha256 key, old hash()) in microseconds per block, each from the token list slice as the manager gets it."""
    tokens = list(range(1000, 1000 + 4 * block_size))
    bm = BlockManager(1, block_size)
    parent = root_key()
    number = 20_000 if block_size <= 16 else 4_000

    def sha() -> bytes:
        return bm.block_key(parent, tuple(tokens[block_size : 2 * block_size]))

    def old() -> int:
        return hash((None, tuple(tokens[block_size : 2 * block_size])))

    sha_us = min(timeit.repeat(sha, number=number, repeat=repeat)) / number * 1e6
    old_us = min(timeit.repeat(old, number=number, repeat=repeat)) / number * 1e6
    return sha_us, old_us


def prompt_lookup_ms(block_size: int, repeat: int) -> float:
    """`match_prefix` of a 4,096-token prompt whose blocks are all cached: one key per block, then a dict hit."""
    prompt = list(range(4096))
    bm = BlockManager(4096 // block_size + 1, block_size)
    table: list[int] = []
    assert bm.allocate(table, len(prompt))
    bm.cache_full_blocks(table, prompt, len(prompt))
    assert len(bm.match_prefix(prompt)) == 4096 // block_size
    return min(timeit.repeat(lambda: bm.match_prefix(prompt), number=50, repeat=repeat)) / 50 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for block_size in (16, 256):
        sha, old = per_block_us(block_size, args.repeat)
        lookup = prompt_lookup_ms(block_size, args.repeat)
        print(
            f"block of {block_size:3d} tokens: sha256 key {sha:5.2f} us (hash() was {old:4.2f} us); "
            f"4,096-token prompt looked up in {lookup:.2f} ms"
        )


if __name__ == "__main__":
    main()

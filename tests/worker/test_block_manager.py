"""The block pool's contract on CPU: exact block ids, free-queue order, prefix hits, and a property test of ref counts.

The model runner trusts these ids blindly, so a leak, a double free or a wrong hit corrupts another request's KV.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker.block_manager import BlockManager, root_key

BLOCK_SIZE = 4


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def filled(bm: BlockManager, token_ids: list[int]) -> list[int]:
    """A sequence whose tokens are all computed: allocated, and its full blocks registered in the prefix cache."""
    table: list[int] = []
    assert bm.allocate(table, len(token_ids))
    bm.cache_full_blocks(table, token_ids, len(token_ids))
    return table


def test_rejects_an_empty_pool() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, BLOCK_SIZE)
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(4, 0)


def test_a_fresh_pool_allocates_ids_in_order() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    first: list[int] = []
    assert bm.allocate(first, 10)
    assert first == [0, 1, 2]
    second: list[int] = []
    assert bm.allocate(second, 1)
    assert second == [3]
    assert list(bm.free_queue) == [4, 5, 6, 7]
    assert [b.ref_count for b in bm.blocks] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (4, 4, 0.5)


def test_allocate_grows_only_by_what_the_tokens_need() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    table: list[int] = []
    assert bm.blocks_needed(table, 0) == 0
    assert bm.blocks_needed(table, 4) == 1
    assert bm.blocks_needed(table, 5) == 2
    assert bm.allocate(table, 4)
    assert table == [0]
    assert bm.allocate(table, 4)  # already holds 4 tokens
    assert bm.allocate(table, 2)  # never shrinks
    assert table == [0]
    assert bm.blocks_needed(table, 9) == 2
    assert bm.allocate(table, 9)
    assert table == [0, 1, 2]


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(4, BLOCK_SIZE)
    first = filled(bm, tokens(4))
    assert first == [0]
    second: list[int] = []
    bm.take_cached(second, bm.match_prefix(tokens(4)))  # a table that already holds a hit keeps exactly that
    assert not bm.allocate(second, 20)  # needs 4 more, 3 are free
    assert second == [0]
    assert list(bm.free_queue) == [1, 2, 3]
    assert [b.ref_count for b in bm.blocks] == [2, 0, 0, 0]
    assert bm.allocate(second, 16)
    assert second == [0, 1, 2, 3]
    assert not bm.allocate(first, 5)
    assert first == [0]
    assert bm.num_free_blocks == 0


def test_free_puts_cached_blocks_at_the_tail_last_block_first_and_unhashed_ones_at_the_head() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    table = filled(bm, tokens(10))  # blocks 0 and 1 are full and cached, block 2 holds 2 tokens
    assert table == [0, 1, 2]
    assert [b.block_hash is not None for b in bm.blocks[:3]] == [True, True, False]
    bm.free(table)
    assert table == []
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert [b.ref_count for b in bm.blocks] == [0] * 8


def test_unhashed_blocks_of_a_sequence_go_to_the_head_in_table_order() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    a: list[int] = []
    b: list[int] = []
    assert bm.allocate(a, 8)
    assert bm.allocate(b, 8)
    assert (a, b) == ([0, 1], [2, 3])
    bm.free(b)
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7]
    bm.free(a)
    assert list(bm.free_queue) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert bm.cached == {}


def test_allocation_evicts_from_the_head_in_free_order() -> None:
    bm = BlockManager(6, BLOCK_SIZE)
    a = filled(bm, tokens(8, start=100))
    b = filled(bm, tokens(8, start=200))
    assert (a, b) == ([0, 1], [2, 3])
    bm.free(a)
    bm.free(b)
    # The least recently freed sequence is evicted first, and within it the last (least shared) block first.
    assert list(bm.free_queue) == [4, 5, 1, 0, 3, 2]
    table: list[int] = []
    assert bm.allocate(table, 16)
    assert table == [4, 5, 1, 0]
    assert list(bm.free_queue) == [3, 2]


def test_prefix_hits_return_exact_block_ids_for_full_blocks_only() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    prompt = tokens(10)
    table = filled(bm, prompt)
    assert table == [0, 1, 2]
    assert len(bm.cached) == 2
    assert bm.match_prefix(prompt) == [0, 1]
    assert bm.match_prefix(prompt[:8]) == [0, 1]
    assert bm.match_prefix(prompt[:7]) == [0]
    assert bm.match_prefix(prompt[:4]) == [0]
    assert bm.match_prefix(prompt[:3]) == []
    assert bm.match_prefix([*prompt[:8], 999, 999, 999, 999]) == [0, 1]
    assert bm.match_prefix([*prompt[:5], 999, *prompt[6:]]) == [0]
    assert bm.match_prefix([999, *prompt[1:]]) == []
    # Matching takes nothing.
    assert [b.ref_count for b in bm.blocks[:3]] == [1, 1, 1]
    assert list(bm.free_queue) == [3, 4, 5, 6, 7]


def test_partial_blocks_are_never_cached() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    prompt = tokens(7)
    table: list[int] = []
    assert bm.allocate(table, 7)
    bm.cache_full_blocks(table, prompt, 3)
    assert bm.cached == {}
    assert bm.match_prefix(prompt) == []
    bm.cache_full_blocks(table, prompt, 7)
    assert list(bm.cached.values()) == [0]
    assert bm.blocks[0].token_ids == (100, 101, 102, 103)
    assert bm.blocks[1].block_hash is None
    assert bm.blocks[1].token_ids == ()
    assert bm.match_prefix(prompt) == [0]
    # Once the block fills up (more tokens computed), it is registered, chained after block 0.
    grown = [*prompt, 107]
    bm.cache_full_blocks(table, grown, 8)
    assert sorted(bm.cached.values()) == [0, 1]
    assert bm.match_prefix(grown) == [0, 1]


def test_the_hash_is_chained_so_a_block_after_a_different_prefix_does_not_hit() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    a_tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    b_tokens = [9, 9, 9, 9, 5, 6, 7, 8]
    a = filled(bm, a_tokens)
    assert bm.match_prefix(b_tokens) == []
    assert bm.match_prefix([5, 6, 7, 8]) == []  # a's second block, at the start of a sequence
    b = filled(bm, b_tokens)
    assert (a, b) == ([0, 1], [2, 3])
    assert bm.blocks[1].token_ids == bm.blocks[3].token_ids == (5, 6, 7, 8)
    assert bm.blocks[1].block_hash != bm.blocks[3].block_hash
    assert len(bm.cached) == 4
    assert bm.match_prefix(a_tokens) == [0, 1]
    assert bm.match_prefix(b_tokens) == [2, 3]


def test_a_hit_is_confirmed_by_comparing_tokens() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    filled(bm, [1, 2, 3, 4])
    # Fake a hash collision: another block's hash maps to block 0, which holds different tokens.
    other = BlockManager(8, BLOCK_SIZE)
    filled(other, [5, 6, 7, 8])
    (colliding_hash,) = other.cached
    bm.cached[colliding_hash] = 0
    assert bm.match_prefix([5, 6, 7, 8]) == []
    assert bm.match_prefix([1, 2, 3, 4]) == [0]


def test_keys_are_sha256_digests_of_the_parent_key_and_the_tokens() -> None:
    """A key is a collision-resistant digest of everything before the block's end, not Python's hash() of one tuple:
    a client cannot craft a prompt whose block takes another prompt's place in the cache."""
    bm = BlockManager(8, BLOCK_SIZE)
    filled(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    first, second = bm.blocks[0].block_hash, bm.blocks[1].block_hash
    assert isinstance(first, bytes) and len(first) == 32
    packed = struct.Struct("<4q").pack
    assert first == hashlib.sha256(root_key() + packed(1, 2, 3, 4)).digest()
    assert second == hashlib.sha256(first + packed(5, 6, 7, 8)).digest()
    assert bm.cached == {first: 0, second: 1}


def test_the_same_tokens_after_different_parents_have_different_keys() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    parents = [
        root_key(),
        root_key("a"),
        bm.block_key(root_key(), [1, 2, 3, 4]),
        bm.block_key(root_key(), [1, 2, 3, 5]),
    ]
    keys = {bm.block_key(parent, [5, 6, 7, 8]) for parent in parents}
    assert len(keys) == len(parents)
    # token ids are packed at a fixed width: no two different blocks give the same bytes
    assert bm.block_key(root_key(), [1, 23, 4, 5]) != bm.block_key(root_key(), [12, 3, 4, 5])
    assert bm.block_key(root_key(), [256, 0, 0, 0]) != bm.block_key(root_key(), [0, 1, 0, 0])


def test_requests_of_different_salts_never_share_a_block() -> None:
    bm = BlockManager(16, BLOCK_SIZE)
    prompt = tokens(10)
    table: list[int] = []
    assert bm.allocate(table, len(prompt))
    bm.cache_full_blocks(table, prompt, len(prompt), cache_salt="tenant-a")
    assert table == [0, 1, 2]
    assert bm.match_prefix(prompt, "tenant-a") == [0, 1]
    assert bm.match_prefix(prompt, "tenant-b") == []
    assert bm.match_prefix(prompt) == []  # nor unsalted requests
    # the salt keys the first block; the chain carries it to every later one
    assert bm.match_prefix(prompt[4:], "tenant-a") == []
    unsalted = filled(bm, prompt)
    assert unsalted == [3, 4, 5]
    assert bm.match_prefix(prompt) == [3, 4]
    assert bm.match_prefix(prompt, "tenant-a") == [0, 1]
    assert {bm.blocks[0].block_hash, bm.blocks[1].block_hash}.isdisjoint(
        {bm.blocks[3].block_hash, bm.blocks[4].block_hash}
    )
    assert root_key("tenant-a") != root_key("tenant-b") != root_key()


def test_identical_full_blocks_computed_twice_keep_the_first_registration() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    a = filled(bm, tokens(4))
    b = filled(bm, tokens(4))
    assert (a, b) == ([0], [1])
    assert bm.blocks[0].block_hash == bm.blocks[1].block_hash
    assert list(bm.cached.values()) == [0]
    bm.free(a)
    evict: list[int] = []
    assert bm.allocate(evict, 4 * 7)  # every free block, block 0 last
    assert evict == [2, 3, 4, 5, 6, 7, 0]
    assert bm.cached == {}  # block 0's entry went with it; block 1's duplicate hash never owned the entry
    assert bm.match_prefix(tokens(4)) == []


def test_eviction_forgets_the_hash_so_a_later_lookup_misses() -> None:
    bm = BlockManager(4, BLOCK_SIZE)
    prompt = tokens(8)
    bm.free(filled(bm, prompt))
    assert list(bm.free_queue) == [2, 3, 1, 0]
    hash_0, hash_1 = bm.blocks[0].block_hash, bm.blocks[1].block_hash
    table: list[int] = []
    assert bm.allocate(table, 12)
    assert table == [2, 3, 1]
    assert bm.blocks[1].block_hash is None
    assert bm.blocks[1].token_ids == ()
    assert hash_1 not in bm.cached
    assert hash_0 is not None
    assert bm.cached == {hash_0: 0}
    assert bm.match_prefix(prompt) == [0]
    assert bm.allocate(table, 16)
    assert table == [2, 3, 1, 0]
    assert bm.cached == {}
    assert bm.match_prefix(prompt) == []


def test_take_cached_of_an_unreferenced_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    prompt = tokens(10)
    bm.free(filled(bm, prompt))
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    table: list[int] = []
    hits = bm.match_prefix(prompt)
    assert hits == [0, 1]
    bm.take_cached(table, hits)
    assert table == [0, 1]
    assert [b.ref_count for b in bm.blocks[:2]] == [1, 1]
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7]
    assert bm.num_free_blocks == 6
    assert bm.allocate(table, 11)
    assert table == [0, 1, 2]


def test_take_cached_of_a_referenced_block_shares_it() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    prompt = tokens(10)
    a = filled(bm, prompt)
    assert a == [0, 1, 2]
    b: list[int] = []
    bm.take_cached(b, bm.match_prefix(prompt))
    assert bm.allocate(b, 10)
    assert b == [0, 1, 3]
    assert [blk.ref_count for blk in bm.blocks[:4]] == [2, 2, 1, 1]
    assert list(bm.free_queue) == [4, 5, 6, 7]
    bm.free(a)
    assert [blk.ref_count for blk in bm.blocks[:4]] == [1, 1, 0, 1]
    assert list(bm.free_queue) == [2, 4, 5, 6, 7]
    assert bm.match_prefix(prompt) == [0, 1]
    bm.free(b)
    assert list(bm.free_queue) == [3, 2, 4, 5, 6, 7, 1, 0]
    assert bm.num_free_blocks == 8


def test_freeing_twice_raises() -> None:
    bm = BlockManager(4, BLOCK_SIZE)
    table: list[int] = []
    assert bm.allocate(table, 4)
    stale = list(table)
    bm.free(table)
    assert table == []
    bm.free(table)  # an emptied table frees nothing
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        bm.free(stale)
    assert list(bm.free_queue) == [0, 1, 2, 3]


def test_without_prefix_caching_nothing_is_registered_or_hit() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    prompt = tokens(8)
    table = filled(bm, prompt)
    assert bm.cached == {}
    assert all(b.block_hash is None for b in bm.blocks)
    bm.free(table)
    assert bm.match_prefix(prompt) == []


def test_reset_prefix_cache_forgets_only_unreferenced_blocks() -> None:
    bm = BlockManager(8, BLOCK_SIZE)
    kept = filled(bm, tokens(4, start=100))
    bm.free(filled(bm, tokens(4, start=200)))
    assert len(bm.cached) == 2
    bm.reset_prefix_cache()
    assert list(bm.cached.values()) == kept == [0]
    assert bm.blocks[1].block_hash is None
    assert bm.match_prefix(tokens(4, start=200)) == []
    assert bm.match_prefix(tokens(4, start=100)) == [0]


# --- property test ---------------------------------------------------------------------------------------------

PROP_BLOCK_SIZE = 2
PROP_NUM_BLOCKS = 10
# A three-token alphabet and two-token blocks: nine possible blocks, so prefixes are shared all the time.
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=9)
salts = st.sampled_from([None, None, "a"])  # mostly unsalted, so hits stay frequent
Prefix = tuple[str | None, tuple[int, ...]]  # a request's salt and every token up to a block's end


@dataclass
class Live:
    token_ids: list[int]
    table: list[int]
    salt: str | None = None


@settings(max_examples=200, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
class BlockPoolMachine(RuleBasedStateMachine):
    """Adds (with prefix hits), growth, frees and preemptions in any order; the pool's books must always balance."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(PROP_NUM_BLOCKS, PROP_BLOCK_SIZE)
        self.live: list[Live] = []
        self.preempted: list[tuple[list[int], str | None]] = []
        # What each full block holds: the whole token prefix up to its end (the KV depends on it all), and the salt of
        # the request that computed it (which alone may hit it).
        self.content: dict[int, Prefix] = {}

    # -- helpers --

    def _full_prefixes(self, seq: Live) -> list[tuple[int, Prefix]]:
        bs = PROP_BLOCK_SIZE
        return [
            (seq.table[i], (seq.salt, tuple(seq.token_ids[: (i + 1) * bs]))) for i in range(len(seq.token_ids) // bs)
        ]

    def _allocate(self, seq: Live) -> bool:
        bm = self.bm
        table_before = list(seq.table)
        queue_before = list(bm.free_queue)
        needed = bm.blocks_needed(seq.table, len(seq.token_ids))
        ok = bm.allocate(seq.table, len(seq.token_ids))
        if not ok:
            assert needed > len(queue_before)
            assert seq.table == table_before
            assert list(bm.free_queue) == queue_before
            return False
        new = seq.table[len(table_before) :]
        assert new == queue_before[:needed]  # evicted from the head, in order
        assert list(bm.free_queue) == queue_before[needed:]
        for block_id in new:
            assert bm.blocks[block_id].block_hash is None
            self.content.pop(block_id, None)  # overwritten from here on
        bm.cache_full_blocks(seq.table, seq.token_ids, len(seq.token_ids), seq.salt)
        for block_id, prefix in self._full_prefixes(seq):
            assert self.content.setdefault(block_id, prefix) == prefix
        return True

    def _admit(self, token_ids: list[int], salt: str | None, leave_one: bool) -> None:
        bm = self.bm
        bs = PROP_BLOCK_SIZE
        probe = token_ids[:-1] if leave_one else token_ids
        hits = bm.match_prefix(probe, salt)
        assert len(hits) == len(set(hits))
        for index, block_id in enumerate(hits):
            assert self.content.get(block_id) == (salt, tuple(token_ids[: (index + 1) * bs]))
        # The match is the longest: no registered block holds the next full block after the same prefix.
        following = len(hits) + 1
        if following * bs <= len(probe):
            target = (salt, tuple(probe[: following * bs]))
            for block_id, prefix in self.content.items():
                block_hash = bm.blocks[block_id].block_hash
                assert not (prefix == target and block_hash is not None and bm.cached.get(block_hash) == block_id)
        seq = Live(list(token_ids), [], salt)
        unreferenced = [b for b in hits if bm.blocks[b].ref_count == 0]
        queue_before = list(bm.free_queue)
        bm.take_cached(seq.table, hits)
        assert seq.table == hits
        assert list(bm.free_queue) == [b for b in queue_before if b not in unreferenced]
        if self._allocate(seq):
            self.live.append(seq)
        else:  # no room: give the hits back and retry later, as the scheduler's waiting queue would
            bm.free(seq.table)
            self.preempted.append((list(token_ids), salt))

    def _drop(self, index: int) -> Live:
        bm = self.bm
        seq = self.live.pop(index % len(self.live))
        queue_before = list(bm.free_queue)
        refs = {b: bm.blocks[b].ref_count for b in seq.table}
        dropped = [b for b in seq.table if refs[b] == 1]
        head = [b for b in dropped if bm.blocks[b].block_hash is None]
        tail = [b for b in reversed(seq.table) if refs[b] == 1 and bm.blocks[b].block_hash is not None]
        table = seq.table
        bm.free(table)
        assert table == []
        assert list(bm.free_queue) == head + queue_before + tail
        for block_id, count in refs.items():
            assert bm.blocks[block_id].ref_count == count - 1
        return seq

    # -- rules --

    @rule(token_ids=token_lists, salt=salts, leave_one=st.booleans())
    def add(self, token_ids: list[int], salt: str | None, leave_one: bool) -> None:
        self._admit(token_ids, salt, leave_one)

    @precondition(lambda self: bool(self.live))
    @rule(index=st.integers(0, 100), more=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def grow(self, index: int, more: list[int]) -> None:
        seq = self.live[index % len(self.live)]
        seq.token_ids.extend(more)
        if not self._allocate(seq):  # out of blocks: preempt it by recompute
            dropped = self._drop(index)
            self.preempted.append((dropped.token_ids, dropped.salt))

    @precondition(lambda self: bool(self.live))
    @rule(index=st.integers(0, 100))
    def finish(self, index: int) -> None:
        self._drop(index)

    @precondition(lambda self: bool(self.live))
    @rule(index=st.integers(0, 100))
    def preempt(self, index: int) -> None:
        dropped = self._drop(index)
        self.preempted.append((dropped.token_ids, dropped.salt))

    @precondition(lambda self: bool(self.preempted))
    @rule(leave_one=st.booleans())
    def resume(self, leave_one: bool) -> None:
        token_ids, salt = self.preempted.pop(0)
        self._admit(token_ids, salt, leave_one)

    @precondition(lambda self: bool(self.preempted))
    @rule()
    def abort_waiting(self) -> None:
        self.preempted.pop()

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()
        for block in self.bm.blocks:
            if block.ref_count == 0:
                assert block.block_hash is None
                self.content.pop(block.block_id, None)

    # -- invariants --

    @invariant()
    def ref_counts_match_the_live_tables(self) -> None:
        holders = [0] * PROP_NUM_BLOCKS
        for seq in self.live:
            assert len(seq.table) == len(set(seq.table)), seq.table
            assert len(seq.table) == -(-len(seq.token_ids) // PROP_BLOCK_SIZE)
            for block_id in seq.table:
                holders[block_id] += 1
        assert [b.ref_count for b in self.bm.blocks] == holders

    @invariant()
    def the_free_queue_holds_exactly_the_unreferenced_blocks(self) -> None:
        bm = self.bm
        queue = list(bm.free_queue)
        assert len(queue) == len(set(queue))
        assert set(queue) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_free_blocks == len(queue)

    @invariant()
    def the_prefix_cache_is_consistent(self) -> None:
        bm = self.bm
        for block_hash, block_id in bm.cached.items():
            assert bm.blocks[block_id].block_hash == block_hash
        hashed = [b for b in bm.blocks if b.block_hash is not None]
        for block in hashed:
            _, prefix = self.content[block.block_id]
            assert len(prefix) % PROP_BLOCK_SIZE == 0
            assert block.token_ids == prefix[-PROP_BLOCK_SIZE:]
        # Chained: two blocks share a hash exactly when everything up to their ends, and their salt, is the same.
        for first in hashed:
            for second in hashed:
                same_hash = first.block_hash == second.block_hash
                assert same_hash == (self.content[first.block_id] == self.content[second.block_id])

    @invariant()
    def live_blocks_hold_their_sequences_tokens(self) -> None:
        for seq in self.live:
            for block_id, prefix in self._full_prefixes(seq):
                assert self.content[block_id] == prefix
            # Only full, hashed blocks are ever shared.
            for block_id in seq.table:
                if self.bm.blocks[block_id].ref_count > 1:
                    assert self.bm.blocks[block_id].block_hash is not None


# No interleaving of adds, growth, frees and preemptions leaks or double-frees a block.
TestBlockPool = BlockPoolMachine.TestCase

"""The scheduler's contract without a model: token budgets, chunked prefill, prefix hits, preemption and stop rules.

Sampled tokens are faked, so each step's plan, block ids and finish reasons can be asserted exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.block_manager import BlockManager
from worker.messages import SamplingParams
from worker.scheduler import Scheduler, SchedulerOutput
from worker.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4
EOS = 2
FILLER = 7  # the token every request samples unless a test says otherwise

Plan = list[tuple[str, int, bool]]  # (request id, new tokens, samples) per scheduled request


@dataclass
class Step:
    out: SchedulerOutput
    plan: Plan
    finished: list[Sequence]


class Harness:
    """A scheduler over a real block pool, with the engine's bookkeeping checked after every step."""

    def __init__(
        self,
        num_blocks: int = 64,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 64,
        max_model_len: int = 256,
    ) -> None:
        self.bm = BlockManager(num_blocks, BLOCK_SIZE)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, max_model_len, [EOS])
        self.seqs: list[Sequence] = []

    def add(self, request_id: str, prompt: list[int], arrival: int | None = None, **params: Any) -> Sequence:
        seq = Sequence(request_id, prompt, SamplingParams(**params), len(self.seqs) if arrival is None else arrival)
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def schedule(self) -> tuple[SchedulerOutput, Plan]:
        out = self.sched.schedule()
        plan = [(item.seq.request_id, item.num_new_tokens, item.sample) for item in out.scheduled]
        assert out.num_batched_tokens == sum(n for _, n, _ in plan) <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        return out, plan

    def update(self, out: SchedulerOutput, tokens: Mapping[str, int] | None = None) -> list[Sequence]:
        wanted = tokens or {}
        sampled = {
            item.seq.request_id: [wanted.get(item.seq.request_id, FILLER)] for item in out.scheduled if item.sample
        }
        finished = self.sched.update(out, sampled)
        self.check()
        return finished

    def step(self, tokens: Mapping[str, int] | None = None) -> Step:
        out, plan = self.schedule()
        return Step(out, plan, self.update(out, tokens))

    def check(self) -> None:
        bm = self.bm
        holders = [0] * bm.num_blocks
        for seq in self.sched.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) == -(-seq.num_computed_tokens // BLOCK_SIZE)
            for block_id in seq.block_table:
                holders[block_id] += 1
        assert [b.ref_count for b in bm.blocks] == holders
        assert set(bm.free_queue) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        for seq in self.seqs:
            if seq not in self.sched.running:
                assert seq.block_table == []
                assert seq.status is (SequenceStatus.WAITING if seq in self.sched.waiting else SequenceStatus.FINISHED)


def ids(seqs: Iterable[Sequence]) -> list[str]:
    return [seq.request_id for seq in seqs]


def test_decodes_go_before_a_long_prefill_and_are_never_starved() -> None:
    h = Harness(max_num_batched_tokens=8)
    a = h.add("a", [10, 11, 12], max_tokens=100)
    assert h.step().plan == [("a", 3, True)]
    b = h.add("b", list(range(100, 130)), max_tokens=100)
    plans = [h.step() for _ in range(6)]
    assert [s.plan for s in plans] == [
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 2, True)],
        [("a", 1, True), ("b", 1, True)],
    ]
    assert [s.out.num_batched_tokens for s in plans] == [8, 8, 8, 8, 3, 2]
    assert a.num_output_tokens == 7
    assert b.num_output_tokens == 2
    assert (b.num_computed_tokens, b.num_tokens) == (31, 32)


def test_chunked_prefill_spends_the_budget_exactly_and_samples_only_when_caught_up() -> None:
    h = Harness(max_num_batched_tokens=16)
    a = h.add("a", list(range(100, 140)))
    progress = []
    for _ in range(4):
        step = h.step()
        progress.append((step.plan, step.out.num_batched_tokens, a.num_computed_tokens, a.num_output_tokens))
    assert progress == [
        ([("a", 16, False)], 16, 16, 0),
        ([("a", 16, False)], 16, 32, 0),
        ([("a", 8, True)], 8, 40, 1),
        ([("a", 1, True)], 1, 41, 2),
    ]
    assert a.block_table == list(range(11))


def test_leftover_budget_starts_the_next_prompt_in_a_chunk() -> None:
    h = Harness(max_num_batched_tokens=16)
    h.add("a", list(range(100, 110)))
    b = h.add("b", list(range(200, 210)))
    first = h.step()
    assert first.plan == [("a", 10, True), ("b", 6, False)]
    assert b.num_output_tokens == 0
    second = h.step()
    assert second.plan == [("a", 1, True), ("b", 4, True)]
    assert second.out.num_batched_tokens == 5
    assert h.step().plan == [("a", 1, True), ("b", 1, True)]


def test_max_num_seqs_caps_the_running_set_and_admission_is_first_come_first_served() -> None:
    h = Harness(max_num_seqs=2)
    h.add("a", [10, 11, 12], max_tokens=1)
    h.add("b", [20, 21, 22], max_tokens=5)
    h.add("c", [30, 31, 32], max_tokens=5)
    h.add("d", [40, 41, 42], max_tokens=5)
    first = h.step()
    assert first.plan == [("a", 3, True), ("b", 3, True)]
    assert ids(first.finished) == ["a"]
    assert ids(h.sched.waiting) == ["c", "d"]
    second = h.step()
    assert second.plan == [("b", 1, True), ("c", 3, True)]
    assert ids(h.sched.running) == ["b", "c"]
    assert ids(h.sched.waiting) == ["d"]


def test_a_waiting_head_that_does_not_fit_blocks_the_requests_behind_it() -> None:
    h = Harness(num_blocks=8, max_num_batched_tokens=64)
    h.add("r", list(range(100, 116)), max_tokens=2)
    assert h.step().plan == [("r", 16, True)]
    h.add("w1", list(range(200, 212)))  # 3 blocks, with 1 of headroom: does not fit in the 3 left
    h.add("w2", [300, 301])  # would fit, but must not overtake w1
    out, plan = h.schedule()
    assert plan == [("r", 1, True)]
    assert len(h.sched.running[0].block_table) == 5
    assert h.bm.num_free_blocks == 3
    assert ids(h.sched.waiting) == ["w1", "w2"]
    assert ids(h.update(out)) == ["r"]
    assert h.step().plan == [("w1", 12, True), ("w2", 2, True)]


def test_a_prefix_hit_starts_the_request_after_the_cached_blocks() -> None:
    h = Harness(num_blocks=16)
    prompt = list(range(100, 110))
    h.add("a", prompt, max_tokens=1)
    step = h.step()
    assert step.plan == [("a", 10, True)]
    assert ids(step.finished) == ["a"]
    assert list(h.bm.free_queue) == [2, *range(3, 16), 1, 0]
    b = h.add("b", [*prompt, 120, 121])
    out, plan = h.schedule()
    assert plan == [("b", 4, True)]
    assert (b.num_computed_tokens, b.num_cached_tokens) == (8, 8)
    assert b.block_table == [0, 1, 2]
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (10 + 12, 8)
    h.update(out)
    assert b.output_token_ids == [FILLER]


@pytest.mark.parametrize(
    ("prompt_len", "expected_cached"),
    [(3, 0), (4, 0), (5, 4), (8, 4), (9, 8), (12, 8)],
)
def test_an_identical_prompt_hits_whole_blocks_but_recomputes_its_last_token(
    prompt_len: int, expected_cached: int
) -> None:
    h = Harness(num_blocks=16)
    prompt = list(range(100, 100 + prompt_len))
    h.add("first", prompt, max_tokens=1)
    h.step()
    again = h.add("again", list(prompt), max_tokens=1)
    out, plan = h.schedule()
    assert plan == [("again", prompt_len - expected_cached, True)]
    assert again.num_computed_tokens == again.num_cached_tokens == expected_cached
    assert h.update(out) == [again]


def test_the_newest_running_request_is_preempted_and_later_resumes() -> None:
    h = Harness(num_blocks=4, max_num_batched_tokens=64)
    a = h.add("a", list(range(100, 108)), max_tokens=2)
    b = h.add("b", list(range(200, 204)), max_tokens=3)
    assert h.step().plan == [("a", 8, True), ("b", 4, True)]
    assert (a.block_table, b.block_table) == ([0, 1], [2])
    c = h.add("c", list(range(300, 308)), max_tokens=1)

    out, plan = h.schedule()  # both need a new block; one is left
    assert plan == [("a", 1, True)]
    assert out.preempted == [b]
    assert out.num_batched_tokens == 1
    assert b.status is SequenceStatus.WAITING
    assert ids(h.sched.waiting) == ["b", "c"]  # back at the head, ahead of later arrivals
    assert b.block_table == []
    assert b.num_computed_tokens == 0
    assert (b.num_preemptions, h.sched.num_preemptions) == (1, 1)
    assert a.block_table == [0, 1, 3]
    assert list(h.bm.free_queue) == [2]
    assert h.update(out) == [a]
    assert list(h.bm.free_queue) == [3, 2, 1, 0]

    # b recomputes, starting after its own block that is still in the prefix cache.
    out, plan = h.schedule()
    assert plan == [("b", 1, True)]
    assert (b.status, b.num_computed_tokens) == (SequenceStatus.RUNNING, 4)
    assert b.block_table == [2, 3]
    assert b.num_cached_tokens == 0  # reported for the first schedule only
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (8 + 4, 0)  # counted at first admission
    assert ids(h.sched.waiting) == ["c"]  # 2 blocks plus headroom do not fit in the 2 left
    h.update(out)
    assert b.output_token_ids == [FILLER, FILLER]
    fourth = h.step()
    assert (fourth.plan, fourth.finished) == ([("b", 1, True)], [b])
    assert b.finish_reason == "length"
    assert b.num_preemptions == 1
    assert list(h.bm.free_queue) == [3, 1, 0, 2]
    fifth = h.step()
    assert (fifth.plan, fifth.finished) == ([("c", 8, True)], [c])
    assert c.num_preemptions == 0
    assert h.sched.num_preemptions == 1
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (8 + 4 + 8, 0)
    assert h.bm.num_free_blocks == 4


def test_a_victim_already_scheduled_this_step_is_taken_out_of_the_step() -> None:
    h = Harness(num_blocks=4, max_num_batched_tokens=8)
    # v is newer (a later arrival) but was queued first, so it decodes ahead of s's chunked prefill.
    v = h.add("v", list(range(100, 104)), arrival=1, max_tokens=2)
    s = h.add("s", list(range(200, 212)), arrival=0, max_tokens=1)
    assert h.step().plan == [("v", 4, True), ("s", 4, False)]
    assert (v.block_table, s.block_table) == ([0], [1])

    out, plan = h.schedule()  # v's decode takes block 2, then s needs 2 more with 1 left: v is the victim
    assert plan == [("s", 7, False)]
    assert out.preempted == [v]
    assert out.num_batched_tokens == 7  # v's token went back to the budget
    assert v.status is SequenceStatus.WAITING
    assert v.block_table == []
    assert s.block_table == [1, 2, 3]
    assert list(h.bm.free_queue) == [0]
    h.update(out)

    third = h.step()  # v waits: its own cached block plus a new one, and headroom, do not fit in 1
    assert third.plan == [("s", 1, True)]
    assert third.finished == [s]
    assert list(h.bm.free_queue) == [0, 3, 2, 1]

    out, plan = h.schedule()
    assert plan == [("v", 1, True)]
    assert v.num_computed_tokens == 4
    assert v.block_table == [0, 3]
    assert h.update(out) == [v]
    assert v.output_token_ids == [FILLER, FILLER]


@pytest.mark.parametrize(
    ("params", "tokens", "steps", "reason"),
    [
        ({}, [5, EOS], 2, "stop"),
        ({"max_tokens": 2}, [5, EOS], 2, "stop"),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], 3, "length"),
        ({"stop_token_ids": [9]}, [5, 9], 2, "stop"),
        ({"stop_token_ids": [9], "ignore_eos": True}, [EOS, 9], 2, "stop"),
        ({"min_tokens": 3, "stop_token_ids": [9]}, [EOS, 9, EOS], 3, "stop"),
        ({"min_tokens": 2}, [EOS, 5, EOS], 3, "stop"),
        ({"max_tokens": 2}, [5, 6], 2, "length"),
        ({"max_tokens": 1}, [5], 1, "length"),
    ],
)
def test_stop_rules(params: dict[str, Any], tokens: list[int], steps: int, reason: str) -> None:
    h = Harness()
    seq = h.add("r", [10, 11, 12], **params)
    for index, token in enumerate(tokens):
        finished = h.step({"r": token}).finished
        assert finished == ([seq] if index == steps - 1 else []), index
        if finished:
            break
    assert seq.status is SequenceStatus.FINISHED
    assert seq.finish_reason == reason
    assert seq.output_token_ids == tokens[:steps]
    assert seq.block_table == []
    assert h.bm.num_free_blocks == h.bm.num_blocks
    assert not h.sched.has_work()


def test_max_model_len_ends_a_request_with_length() -> None:
    h = Harness(max_model_len=6)
    seq = h.add("r", [10, 11, 12], max_tokens=16)
    assert [h.step().finished for _ in range(3)] == [[], [], [seq]]
    assert seq.finish_reason == "length"
    assert seq.num_tokens == 6
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_abort_of_waiting_and_running_requests_frees_their_blocks() -> None:
    h = Harness(num_blocks=16, max_num_seqs=1, max_num_batched_tokens=8)
    running = h.add("running", list(range(100, 120)))
    waiting = h.add("waiting", [30, 31])
    assert h.step().plan == [("running", 8, False)]  # mid-prefill
    assert running.block_table == [0, 1]
    assert ids(h.sched.waiting) == ["waiting"]
    h.sched.abort(waiting)
    assert (waiting.status, waiting.finish_reason) == (SequenceStatus.FINISHED, "abort")
    assert list(h.sched.waiting) == []
    h.sched.abort(running)
    assert (running.status, running.finish_reason) == (SequenceStatus.FINISHED, "abort")
    assert running.block_table == []
    assert h.sched.running == []
    assert h.bm.num_free_blocks == 16
    # Its 8 computed tokens filled both blocks, so they stay cached at the tail, last block first.
    assert list(h.bm.free_queue) == [*range(2, 16), 1, 0]
    assert h.bm.match_prefix(list(range(100, 120))) == [0, 1]
    assert not h.sched.has_work()
    h.check()
    assert h.sched.schedule().scheduled == []


def test_abort_of_a_preempted_request_frees_nothing_twice() -> None:
    h = Harness(num_blocks=4)
    h.add("a", list(range(100, 108)), max_tokens=5)
    b = h.add("b", list(range(200, 204)), max_tokens=5)
    h.step()
    out, _ = h.schedule()
    assert out.preempted == [b]
    h.update(out)
    h.sched.abort(b)
    assert b.finish_reason == "abort"
    assert list(h.sched.waiting) == []
    h.check()


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.integers(1, 6), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    budget=st.integers(1, 12),
    max_num_seqs=st.integers(1, 4),
)
def test_any_workload_finishes_every_request_and_returns_every_block(
    requests: list[tuple[list[int], int, bool]], budget: int, max_num_seqs: int
) -> None:
    # 5 blocks of 4 tokens hold any one request (at most 18 tokens), so the oldest always makes progress.
    h = Harness(num_blocks=5, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [h.add(f"r{i}", prompt, max_tokens=max_tokens) for i, (prompt, max_tokens, _) in enumerate(requests)]
    aborted = {seq.request_id for seq, (_, _, abort) in zip(seqs, requests, strict=True) if abort}
    for step in range(400):
        if not h.sched.has_work():
            break
        decoding = [s for s in h.sched.running if s.num_tokens - s.num_computed_tokens == 1]
        out, plan = h.schedule()
        for seq in decoding[:budget]:  # decodes are served first: all of them, up to the budget
            assert seq in out.preempted or (seq.request_id, 1, True) in plan
        h.update(out)
        if step == 3:
            for seq in seqs:
                if seq.request_id in aborted and not seq.is_finished:
                    h.sched.abort(seq)
                    h.check()
    assert not h.sched.has_work()
    for seq, (prompt, max_tokens, _) in zip(seqs, requests, strict=True):
        assert seq.is_finished
        if seq.finish_reason != "abort":
            assert seq.finish_reason == "length"
            assert seq.output_token_ids == [FILLER] * max_tokens
        assert seq.prompt_token_ids == prompt
    assert h.bm.num_free_blocks == 5


def test_proposed_tokens_ride_with_their_decode_and_only_kept_ones_stay_computed() -> None:
    h = Harness(max_num_batched_tokens=8)
    a = h.add("a", [10, 11, 12], max_tokens=100)
    h.step()
    a.draft_token_ids = [20, 21, 22]
    out, plan = h.schedule()
    assert plan == [("a", 4, True)]  # its own last token and the three proposed after it
    assert out.scheduled[0].drafts == [20, 21, 22]
    assert a.block_table == [0, 1]  # room for positions 3..6
    h.update(out, {"a": 20})  # the harness samples one token: none of the proposed ones kept
    assert a.output_token_ids == [FILLER, 20]
    assert a.num_computed_tokens == 4
    assert a.block_table == [0]  # the block of the unkept proposals is given back

    a.draft_token_ids = [30, 31, 32, 33, 34, 35, 36, 37, 38]
    out, plan = h.schedule()
    assert plan == [("a", 8, True)]  # proposals are cut to the token budget
    finished = h.sched.update(out, {"a": [30, 31, 7]})  # two kept, then the model's own token
    h.check()
    assert finished == []
    assert a.output_token_ids == [FILLER, 20, 30, 31, 7]
    assert a.num_computed_tokens == a.num_tokens - 1 == 7


def test_a_stop_among_kept_tokens_drops_the_tokens_after_it() -> None:
    h = Harness()
    a = h.add("a", [10, 11, 12], max_tokens=100)
    h.step()
    a.draft_token_ids = [5, EOS, 6]
    out, _ = h.schedule()
    assert h.sched.update(out, {"a": [5, EOS, 6, 9]}) == [a]
    assert (a.output_token_ids, a.finish_reason) == ([FILLER, 5, EOS], "stop")
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_proposed_tokens_never_take_blocks_or_budget_from_another_request() -> None:
    h = Harness(num_blocks=5, max_num_batched_tokens=16)
    a = h.add("a", [10, 11, 12, 13], max_tokens=100)
    h.add("b", [20, 21, 22, 23], max_tokens=100)
    h.step()
    assert h.bm.num_free_blocks == 3
    a.draft_token_ids = [1, 2, 3, 4, 5]  # would need two blocks of the three left, and b needs one, beside headroom
    out, plan = h.schedule()
    assert plan == [("a", 1, True), ("b", 1, True)]
    assert out.preempted == [] and out.scheduled[0].drafts == []


def test_a_waiting_prompt_takes_the_budget_before_proposed_tokens() -> None:
    h = Harness(max_num_batched_tokens=8)
    a = h.add("a", [10, 11, 12], max_tokens=100)
    h.step()
    h.add("c", list(range(30, 42)), max_tokens=4)
    a.draft_token_ids = [1, 2, 3, 4, 5]
    out, plan = h.schedule()
    assert plan == [("a", 1, True), ("c", 7, False)]
    assert a.draft_token_ids == []
    h.update(out)
    a.draft_token_ids = [1, 2, 3, 4, 5]
    out, plan = h.schedule()
    assert plan == [("a", 3, True), ("c", 5, True)]  # the prompt's last 5 tokens, then 2 proposed ones
    assert out.scheduled[0].drafts == [1, 2]
    h.update(out)

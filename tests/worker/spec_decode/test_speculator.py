"""Which requests propose and how many tokens: by their own acceptance so far against the step's break-even."""

from __future__ import annotations

from worker.messages import SamplingParams, StructuredOutput
from worker.registry import SpeculativeSpec
from worker.sequence import Sequence
from worker.spec_decode.speculator import Speculator, worth_proposing

REPEATING = [5, 6, 7, 8] * 6  # every 2-gram recurs: lookup always has something to propose


def decoding(request_id: str, **params: object) -> Sequence:
    seq = Sequence(request_id, list(REPEATING), SamplingParams(**params), arrival=0)  # type: ignore[arg-type]
    seq.token_ids.append(5)
    return seq


def test_the_length_follows_the_chance_each_position_is_kept() -> None:
    assert worth_proposing(1.0, 0.0, 8) == 8
    assert worth_proposing(0.9, 0.65, 8) == 4  # 0.9^4 = 0.656 beats 0.65, 0.9^5 does not
    assert worth_proposing(0.5, 0.6, 8) == 0
    assert worth_proposing(0.0, 0.0, 8) == 0


def test_a_new_request_proposes_the_most_and_one_that_misses_stops_then_tries_again() -> None:
    speculator = Speculator(SpeculativeSpec(method="ngram", num_tokens=6))
    seq = decoding("a", max_tokens=100)
    speculator.propose([seq], 4096, break_even=0.3)
    assert seq.draft_token_ids == [6, 7, 8, 5, 6, 7]
    for _ in range(3):
        speculator.accepted("a", 6, 0)
    speculator.propose([seq], 4096, break_even=0.3)
    assert seq.draft_token_ids == []
    quiet = 0
    while not seq.draft_token_ids:
        quiet += 1
        speculator.propose([seq], 4096, break_even=0.3)
    assert 5 <= quiet <= 40  # the rate drifts back, and it tries again
    speculator.propose([seq], 4096, break_even=0.0)
    assert seq.draft_token_ids, "with rows free of cost, any chance pays"


def test_requests_that_keep_their_proposals_propose_more_at_a_busy_step() -> None:
    speculator = Speculator(SpeculativeSpec(method="ngram", num_tokens=8))
    good, poor = decoding("good", max_tokens=100), decoding("poor", max_tokens=100)
    for _ in range(4):
        speculator.accepted("good", 8, 8)
        speculator.accepted("poor", 8, 1)
    speculator.propose([good, poor], 4096, break_even=0.5)
    assert len(good.draft_token_ids) == 8
    assert poor.draft_token_ids == []


def test_no_proposals_past_max_tokens_the_context_or_for_a_grammar() -> None:
    speculator = Speculator(SpeculativeSpec(method="ngram", num_tokens=6))
    near_end = decoding("a", max_tokens=3)  # one output so far: room for one proposal and the model's own token
    short_context = decoding("b", max_tokens=100)
    grammar = decoding("c", max_tokens=100, structured=StructuredOutput("json_object"))
    speculator.propose([near_end], 4096, 0.0)
    speculator.propose([short_context], len(REPEATING) + 4, 0.0)
    speculator.propose([grammar], 4096, 0.0)
    assert near_end.draft_token_ids == [6]
    assert short_context.draft_token_ids == [6, 7]
    assert grammar.draft_token_ids == []


def test_counts_add_up_by_position() -> None:
    speculator = Speculator(SpeculativeSpec(method="ngram", num_tokens=4))
    speculator.accepted("a", 4, 2)
    speculator.accepted("b", 3, 3)
    speculator.accepted("a", 4, 0)
    counts = speculator.counts
    assert (counts.num_drafts, counts.num_draft_tokens, counts.num_accepted_tokens) == (3, 11, 5)
    assert counts.accepted_per_position == [2, 2, 1, 0]
    speculator.release("a")
    assert "a" not in speculator.rates and "a" not in speculator.indexes

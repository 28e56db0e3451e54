"""`Speculator`: which decoding requests propose tokens this step, how many, and the counts behind the metrics.

A proposed token costs a row of the step whether or not it is kept. With a step priced as a fixed part F plus s a
row (`worker.step_budget` measures both), D decoding streams yield D tokens in F + sD; a proposed token kept with
probability q adds q tokens for s more, which raises the step's tokens per second exactly when q > sD / (F + sD):
the share of the step that its rows take (the break-even). One stream on a CPU spends most of a step reading the
weights, so almost any proposal pays; 32 streams spend most of it on their rows, and only likely ones do.

Each request keeps a moving average p of how often a proposed token was kept given the one before it was (a kept
run ends at the first miss), so its i-th proposed token is kept with probability about p^i. It proposes while p^i
beats the break-even, with a margin, up to `num_tokens`; a request whose proposals miss stops proposing, and while
it does not propose its p drifts back up, so it tries again later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.registry import SpeculativeSpec
from worker.sequence import Sequence
from worker.spec_decode.ngram import NgramIndex

SMOOTHING = 0.5  # weight of a step's acceptance in a request's moving average
PRIOR = 1.0  # a new request's rate: it proposes from its first decode
RECOVERY = 0.05  # share of the way back to PRIOR a request's rate moves for each step it does not propose
MARGIN = 1.25  # a request proposes only where its rate beats the break-even one by this factor: costs are noisy


@dataclass
class SpecCounts:
    """Cumulative counts, vLLM's spec_decode metrics."""

    num_drafts: int = 0  # steps in which a request verified proposed tokens
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: kept tokens proposed i-th


def worth_proposing(rate: float, threshold: float, most: int) -> int:
    """How many tokens to propose: the positions i (from 1) whose chance of being kept, rate^i, beats `threshold`,
    at most `most`."""
    length, chance = 0, rate
    while length < most and chance > threshold:
        length += 1
        chance *= rate
    return length


class Speculator:
    def __init__(self, spec: SpeculativeSpec) -> None:
        self.num_tokens = spec.num_tokens
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max
        self.indexes: dict[str, NgramIndex] = {}
        self.rates: dict[str, float] = {}
        self.counts = SpecCounts(accepted_per_position=[0] * spec.num_tokens)

    def propose(self, seqs: Iterable[Sequence], max_model_len: int, break_even: float) -> None:
        """Set each decoding request's `draft_token_ids` for the next step; `break_even`: the acceptance rate above
        which proposing pays at this step's size."""
        for seq in seqs:
            seq.draft_token_ids = []
            params = seq.params
            room = min(params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens) - 1
            if params.structured is not None or room < 1:  # a grammar's matcher checks one token at a time
                continue
            rate = self.rates.get(seq.request_id, PRIOR)
            length = worth_proposing(rate, break_even * MARGIN, min(self.num_tokens, room))
            if not length:
                self.rates[seq.request_id] = rate + (PRIOR - rate) * RECOVERY
                continue
            index = self.indexes.get(seq.request_id)
            if index is None:
                index = self.indexes[seq.request_id] = NgramIndex(self.min_n, self.max_n)
            seq.draft_token_ids = index.propose(seq.token_ids, length)

    def accepted(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Fold in a verification: `num_accepted` of `num_drafts` proposed tokens were kept."""
        counts = self.counts
        counts.num_drafts += 1
        counts.num_draft_tokens += num_drafts
        counts.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            counts.accepted_per_position[position] += 1
        tried = num_accepted + (num_accepted < num_drafts)  # the positions that were decided: kept, then one miss
        rate = self.rates.get(request_id, PRIOR)
        self.rates[request_id] = (1 - SMOOTHING) * rate + SMOOTHING * num_accepted / tried

    def release(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)
        self.rates.pop(request_id, None)

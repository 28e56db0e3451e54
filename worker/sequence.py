"""`Sequence`: the one record of a request's state inside the engine. Only the scheduler changes its status.

Pure Python. `num_computed_tokens` catches up with `num_tokens`: prefill, chunked prefill, prefix hits, decode and
recompute after preemption are all the same arithmetic.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from worker.messages import SampleLogprobs, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # FCFS order
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    queue_seconds: float = 0.0  # from arrival to first schedule
    # with params.prompt_logprobs: those of prompt tokens 1, 2, ... scored so far (position p's logits score p + 1)
    prompt_logprobs: list[SampleLogprobs] = field(default_factory=list)
    # tokens proposed to follow (worker.spec_decode), verified by the next step; never part of token_ids until kept
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs are asked for and some are not computed yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def cacheable_prefix(self) -> int:
        """How many leading tokens the prefix cache may serve: all but the last, which is always computed; while the
        prompt is being scored, only the positions already scored, since a cached position yields no logits."""
        if self.scoring_prompt:
            return min(len(self.prompt_logprobs), self.num_tokens - 1)
        return self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

"""`Scheduler`: iteration-level continuous batching in token counts. Pure Python: it decides, the runner executes.

Each step spends a token budget: running decodes first (so a long prefill never starves them), then running
prefills in chunks, then waiting requests in FCFS order, each starting after its longest prefix-cache hit, and last
the tokens proposed for decodes to verify (`worker.spec_decode`), out of the budget and free blocks left. Prompt
tokens may have a tighter budget of their own while requests decode (`worker.step_budget`). When blocks run out, the
newest running request is preempted by recompute: its blocks are freed and it waits at the head.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from worker.block_manager import BlockManager
from worker.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # rows fed this step: the request's own tokens, then `drafts`
    drafts: list[int] = field(default_factory=list)  # proposed tokens verified this step (worker.spec_decode)

    @property
    def completes(self) -> bool:
        """True when this step's tokens bring the request up to date."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.drafts) == self.seq.num_tokens

    @property
    def sample(self) -> bool:
        """True when its next token is sampled this step: it comes up to date and may generate (max_tokens 0 only
        scores its prompt)."""
        return self.completes and self.seq.params.max_tokens > 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        prompt_budget: Callable[[int, int], int] | None = None,
    ) -> None:
        """`prompt_budget(decodes, joining)`: the most prompt tokens a step may carry, given how many decoding streams
        it carries and how many more requests (part-way through their prompts, or waiting) will decode beside them
        (`worker.step_budget`); None: the whole token budget."""
        self.block_manager = block_manager
        self.prompt_budget = prompt_budget
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        budget = self._schedule_running(decodes, budget, out)
        # prompt tokens, of running prefills and then of waiting requests, within the prompt budget
        if self.prompt_budget is not None:
            decoding = len(out.scheduled)
            joining = min(len(prefills) + len(self.waiting), self.max_num_seqs - decoding)
            budget = min(budget, self.prompt_budget(decoding, joining))
        budget = self._schedule_running(prefills, budget, out)
        if not out.preempted:
            self._add_drafts(self._admit(budget, out), out)
        for seq in self.running:
            seq.draft_token_ids = []
        out.num_batched_tokens = sum(item.num_new_tokens for item in out.scheduled)
        return out

    def _schedule_running(self, seqs: list[Sequence], budget: int, out: SchedulerOutput) -> int:
        for seq in seqs:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            grown, released = self._grow(seq, num_new, out)
            budget += released
            if not grown:
                continue
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def _add_drafts(self, budget: int, out: SchedulerOutput) -> None:
        """Give decodes their proposed tokens from what the step leaves: the token budget, and blocks beyond the
        admission headroom, so proposals never delay a prompt nor preempt a request."""
        bm = self.block_manager
        headroom = max(1, bm.num_blocks // 100)
        for item in out.scheduled:
            seq = item.seq
            drafts = seq.draft_token_ids[:budget]  # cleared for every running request after this
            if not drafts or item.num_new_tokens != 1 or not item.completes:
                continue
            if bm.blocks_needed(seq.block_table, seq.num_tokens + len(drafts)) + headroom > bm.num_free_blocks:
                continue
            bm.allocate(seq.block_table, seq.num_tokens + len(drafts))
            item.drafts = drafts
            item.num_new_tokens += len(drafts)
            budget -= len(drafts)

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> tuple[bool, int]:
        """Allocate blocks for `num_new` more tokens, preempting the newest running requests.

        Returns whether `seq` kept its place, and the budget given back by victims already scheduled this step.
        """
        released = 0
        while not self.block_manager.allocate(seq.block_table, seq.num_computed_tokens + num_new):
            victim = max(self.running, key=lambda s: s.arrival)
            for index, item in enumerate(out.scheduled):
                if item.seq is victim:
                    released += item.num_new_tokens
                    del out.scheduled[index]
                    break
            self._preempt(victim, out)
            if victim is seq:
                return False, released
        return True, released

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.match_prefix(seq.token_ids[: seq.cacheable_prefix], seq.params.cache_salt)
            num_cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            reclaimed = sum(1 for block_id in hits if bm.blocks[block_id].ref_count == 0)
            needed = bm.blocks_needed(hits, num_cached + num_new) + reclaimed
            # Leave a little headroom while others run, so admitting one request does not preempt another next step.
            watermark = max(1, bm.num_blocks // 100) if self.running else 0
            if needed + watermark > bm.num_free_blocks:
                break
            self.waiting.popleft()
            bm.take_cached(seq.block_table, hits)
            if not bm.allocate(seq.block_table, num_cached + num_new):
                raise RuntimeError("block accounting is inconsistent")  # checked just above
            if seq.num_preemptions == 0:
                seq.queue_seconds = time.monotonic() - seq.arrival_time
                seq.num_cached_tokens = num_cached
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.draft_token_ids = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Sequence]:
        """Fold a step's results in: advance computed counts, append sampled tokens (a request that verified
        proposed tokens has the kept ones and one more), finish what stops. Tokens after a stop are dropped."""
        finished: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            will_sample, completes = item.sample, item.completes
            tokens = sampled[seq.request_id] if will_sample else []
            # the cache holds the request's own fed tokens and the proposed ones that were kept
            seq.num_computed_tokens += item.num_new_tokens - len(item.drafts) + max(0, len(tokens) - 1)
            reason = None
            for token in tokens:
                seq.token_ids.append(token)
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    break
            if item.drafts:
                self.block_manager.shrink(seq.block_table, seq.num_computed_tokens)
            self.block_manager.cache_full_blocks(
                seq.block_table, seq.token_ids, min(seq.num_computed_tokens, seq.num_tokens), seq.params.cache_salt
            )
            if completes and not will_sample:  # max_tokens 0: the prompt is in, and nothing is generated
                reason = "length"
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        ):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq.block_table)

"""Prometheus metrics with vLLM's names under the `tokenmill_` prefix and a `model_name` label.

The app process owns the registry: request timings are measured here, engine numbers arrive in each StepOutput.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.messages import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# The label values the app uses, created at zero with each model (other values still appear when first used).
FINISHED_REASONS = ("stop", "length")
REJECTED_REASONS = ("queue_full",)
ABORTED_REASONS = ("client_disconnect", "timeout")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.running = Gauge("tokenmill_num_requests_running", "Requests in the engine's running batch.", m, registry=r)
        self.waiting = Gauge("tokenmill_num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.kv_usage = Gauge(
            "tokenmill_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", m, registry=r
        )
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Generated tokens.", m, registry=r)
        self.success = Counter(
            "tokenmill_request_success", "Finished requests by reason.", [*m, "finished_reason"], registry=r
        )
        self.preemptions = Counter("tokenmill_num_preemptions", "Requests preempted by the scheduler.", m, registry=r)
        self.prefix_queries = Counter("tokenmill_prefix_cache_queries", "Prompt tokens looked up.", m, registry=r)
        self.prefix_hits = Counter("tokenmill_prefix_cache_hits", "Prompt tokens found in the cache.", m, registry=r)
        self.grammar_mask = Counter(
            "tokenmill_grammar_mask_seconds", "Time computing structured-output masks.", m, registry=r
        )
        self.grammar_wait = Counter(
            "tokenmill_grammar_wait_seconds", "Time steps waited for masks after their forward.", m, registry=r
        )
        self.rejected = Counter(
            "tokenmill_requests_rejected", "Requests refused, by reason.", [*m, "reason"], registry=r
        )
        self.aborted = Counter("tokenmill_requests_aborted", "Requests aborted, by reason.", [*m, "reason"], registry=r)
        self.ttft = Histogram(
            "tokenmill_time_to_first_token_seconds", "Time to first token.", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tokenmill_inter_token_latency_seconds", "Time between tokens.", m, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "tokenmill_e2e_request_latency_seconds", "Arrival to last token.", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "tokenmill_request_queue_time_seconds", "Time spent waiting.", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_prompt = Histogram(
            "tokenmill_request_prompt_tokens", "Prompt tokens per request.", m, buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generation = Histogram(
            "tokenmill_request_generation_tokens", "Generated tokens per request.", m, buckets=TOKEN_BUCKETS, registry=r
        )
        self.embedding_inputs = Counter(
            "tokenmill_embedding_inputs", "Inputs embedded (their tokens count as prompt tokens).", m, registry=r
        )
        self.iteration_tokens = Histogram(
            "tokenmill_iteration_tokens", "Tokens per engine step.", m, buckets=TOKEN_BUCKETS, registry=r
        )
        self.spec_drafts = Counter(
            "tokenmill_spec_decode_num_drafts", "Verifications of proposed tokens (speculation).", m, registry=r
        )
        self.spec_draft_tokens = Counter(
            "tokenmill_spec_decode_num_draft_tokens", "Tokens proposed for verification.", m, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "tokenmill_spec_decode_num_accepted_tokens", "Proposed tokens kept.", m, registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "tokenmill_spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens kept, by their position in the proposal (0: the first).",
            [*m, "position"],
            registry=r,
        )
        self._last: dict[str, EngineStats] = {}

    def add_model(self, model: str) -> None:
        """Create every labelled series at zero, so dashboards see each model before its first request."""
        for family in (self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens):
            family.labels(model)
        self.embedding_inputs.labels(model)
        for family in (self.preemptions, self.prefix_queries, self.prefix_hits, self.grammar_mask, self.grammar_wait):
            family.labels(model)
        for family in (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens):
            family.labels(model)
        for histogram in (
            self.ttft,
            self.itl,
            self.e2e,
            self.queue_time,
            self.request_prompt,
            self.request_generation,
            self.iteration_tokens,
        ):
            histogram.labels(model)
        for reason in FINISHED_REASONS:
            self.success.labels(model, reason)
        for reason in REJECTED_REASONS:
            self.rejected.labels(model, reason)
        for reason in ABORTED_REASONS:
            self.aborted.labels(model, reason)

    def observe_step(self, model: str, stats: EngineStats, new_tokens: int) -> None:
        self.running.labels(model).set(stats.num_running)
        self.waiting.labels(model).set(stats.num_waiting)
        if stats.kv_blocks_total:
            self.kv_usage.labels(model).set(stats.kv_blocks_used / stats.kv_blocks_total)
        if stats.step_tokens:
            self.iteration_tokens.labels(model).observe(stats.step_tokens)
        if new_tokens:
            self.generation_tokens.labels(model).inc(new_tokens)
        last = self._last.get(model) or EngineStats()
        for counter, now, before in (
            (self.preemptions, stats.num_preemptions, last.num_preemptions),
            (self.prefix_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
            (self.grammar_mask, stats.grammar_mask_seconds, last.grammar_mask_seconds),
            (self.grammar_wait, stats.grammar_wait_seconds, last.grammar_wait_seconds),
            (self.spec_drafts, stats.spec_num_drafts, last.spec_num_drafts),
            (self.spec_draft_tokens, stats.spec_num_draft_tokens, last.spec_num_draft_tokens),
            (self.spec_accepted_tokens, stats.spec_num_accepted_tokens, last.spec_num_accepted_tokens),
        ):
            # a restarted worker starts its counts again from zero
            counter.labels(model).inc(now - before if now >= before else now)
        earlier = last.spec_accepted_per_position
        for position, now_count in enumerate(stats.spec_accepted_per_position):
            before_count = earlier[position] if position < len(earlier) else 0
            delta = now_count - before_count if now_count >= before_count else now_count
            if delta or not before_count:
                self.spec_accepted_per_pos.labels(model, str(position)).inc(delta)
        self._last[model] = stats

    def request_finished(
        self,
        model: str,
        reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        e2e: float,
        queue_time: float | None,
    ) -> None:
        self.success.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.request_prompt.labels(model).observe(prompt_tokens)
        self.request_generation.labels(model).observe(generation_tokens)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if queue_time is not None:
            self.queue_time.labels(model).observe(queue_time)
        self.e2e.labels(model).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""`Generation`: the engine requests behind one API request (n choices per prompt), turned into text deltas.

Choices after the first of a prompt are submitted once the first has produced a token, so their prompt's full KV
blocks come from the prefix cache instead of being computed n times. Stop strings found while detokenizing become
aborts in the worker; a timeout or a client that goes away aborts every choice. Timings feed the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.detokenizer import IncrementalDetokenizer
from app.engine_client import WorkerGone
from app.errors import APIError
from app.metrics import Metrics
from app.model_pool import ServedModel
from app.protocol_responses import RequestMetrics
from worker.messages import RequestOutput, SampleLogprobs, SamplingParams

KEEPALIVE = None  # yielded by `events` when nothing happened for a while: the SSE layer sends a comment


@dataclass(eq=False)
class Choice:
    index: int
    prompt_index: int
    request_id: str
    detok: IncrementalDetokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleLogprobs] = field(default_factory=list)
    prompt_logprobs: list[SampleLogprobs | None] | None = None  # from the first output, where the params ask
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_seconds: float | None = None
    embedding: bytes | None = None  # an embed model's vector (float32, little-endian)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def num_tokens(self) -> int:
        """Generated tokens that count: after a stop string, those past the one that completed it do not."""
        return min(len(self.token_ids), self.detok.num_tokens) if self.detok.stopped else len(self.token_ids)


@dataclass
class Delta:
    choice: Choice
    text: str
    token_ids: list[int]
    logprobs: list[SampleLogprobs]


class Generation:
    def __init__(
        self,
        served: ServedModel,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        stop: list[str],
        metrics: Metrics,
        timeout: float | None,
        keepalive: float | None,
    ) -> None:
        assert served.tokenizer is not None
        _check_vocabulary(params, served.info.vocab_size)
        self.served = served
        self.client = served.client
        self.prompts = prompts
        self.metrics = metrics
        self.keepalive = keepalive
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout else None
        base = self.client.new_request_id("req")
        self.choices: list[Choice] = []
        for prompt_index, prompt in enumerate(prompts):
            for k in range(n):
                seeded = (
                    params if params.seed is None or k == 0 else msgspec.structs.replace(params, seed=params.seed + k)
                )
                detok = IncrementalDetokenizer(served.tokenizer, prompt, stop=stop)  # type: ignore[arg-type]
                index = len(self.choices)
                self.choices.append(Choice(index, prompt_index, f"{base}-{index}", detok, seeded))
        self._queue: asyncio.Queue[tuple[Choice, RequestOutput | Exception]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._done = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, counted once per prompt like the prompt tokens."""
        leaders = {c.prompt_index: c for c in reversed(self.choices)}
        return sum(c.num_cached_tokens for c in leaders.values())

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def request_metrics(self) -> RequestMetrics:
        """Where the request's time went, up to now (call it once every choice has finished)."""
        now = time.monotonic()
        firsts = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        spans = [
            (c.last_token_at - c.first_token_at, c.num_tokens - 1)
            for c in self.choices
            if c.first_token_at is not None and c.last_token_at is not None and c.num_tokens > 1
        ]
        seconds, gaps = sum(s for s, _ in spans), sum(g for _, g in spans)
        gap = seconds / gaps if gaps and seconds > 0 else None
        return RequestMetrics(
            queue_time_ms=1e3 * max((c.queue_seconds or 0.0 for c in self.choices), default=0.0),
            time_to_first_token_ms=1e3 * (min(firsts) - self.arrival) if firsts else None,
            mean_inter_token_ms=1e3 * gap if gap is not None else None,
            e2e_ms=1e3 * (max((c.last_token_at or now for c in self.choices), default=now) - self.arrival),
            prefill_tokens=self.num_prompt_tokens - self.num_cached_tokens,
            cached_tokens=self.num_cached_tokens,
            decode_tokens=self.num_completion_tokens,
            tokens_per_second=1 / gap if gap is not None else None,
        )

    def start(self) -> None:
        """Call it from the request's own task: the reservation `admit` took passes to the choices' streams, which
        are all open from now on (a choice waiting for its leader counts as in flight too)."""
        if self._started or self._done:
            return
        self._started = True
        leaders: dict[int, Choice] = {}
        for choice in self.choices:
            leader = leaders.setdefault(choice.prompt_index, choice)
            self.client.open_stream(choice.request_id)
            wait_for = None if leader is choice else leader.started
            self._tasks.append(asyncio.create_task(self._pump(choice, wait_for)))
        self.client.admitted()

    async def _pump(self, choice: Choice, wait_for: asyncio.Event | None) -> None:
        try:
            if wait_for is not None:
                await wait_for.wait()
            stream = await self.client.submit(choice.request_id, self.prompts[choice.prompt_index], choice.params)
            if stream is None:
                return  # aborted before it was sent: nothing runs in the worker
            while True:
                out = await stream.next()
                choice.started.set()
                self._queue.put_nowait((choice, out))
                if out.finish_reason is not None:
                    return
        except (WorkerGone, OSError) as exc:
            choice.started.set()
            self._queue.put_nowait((choice, exc))

    async def events(self) -> AsyncIterator[Delta | None]:
        """Text deltas as they come (None: a keep-alive tick). Raises `APIError` if the worker fails or time is up."""
        remaining = len(self.choices)
        try:
            while remaining:
                wait = self.keepalive
                if self.deadline is not None:
                    left = self.deadline - time.monotonic()
                    wait = left if wait is None else min(wait, left)
                    if wait <= 0:
                        self.abort("timeout")
                        raise APIError(408, "the request timed out", type="timeout_error", code="timeout")
                try:
                    choice, item = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:  # a keep-alive tick, or the deadline (caught above next time round)
                    if self.keepalive is not None:
                        yield KEEPALIVE
                    continue
                if choice.finish_reason is not None:
                    continue  # ended by a stop string; what was still in flight does not count
                delta = self._fold(choice, item)
                if choice.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            self.close()

    def _fold(self, choice: Choice, item: RequestOutput | Exception) -> Delta:
        if isinstance(item, Exception):
            self.abort("worker_error")
            raise APIError.worker_lost(self.served.name, restarting=not self.client.failed)
        if item.error is not None:
            choice.finish_reason = "error"  # already gone from the worker
            self.abort(item.error_code or "error")
            if item.error_code == "invalid_request":
                raise APIError.invalid_request(item.error, param=item.error_param, code="invalid_value")
            raise APIError(500, item.error, type="server_error", code=item.error_code or "model_error")
        now = time.monotonic()
        if item.num_prompt_tokens:  # the first output, with or without a token (max_tokens 0 has none)
            choice.queue_seconds = item.queue_seconds
            choice.num_cached_tokens = item.num_cached_tokens
            choice.prompt_logprobs = item.prompt_logprobs
        if item.new_token_ids:
            if choice.first_token_at is None:
                choice.first_token_at = now
            elif choice.last_token_at is not None:
                self.metrics.itl.labels(self.served.name).observe(now - choice.last_token_at)
            choice.last_token_at = now
        choice.token_ids.extend(item.new_token_ids)
        if item.embedding is not None:
            choice.embedding, choice.queue_seconds = item.embedding, item.queue_seconds
        if item.logprobs:
            choice.logprobs.extend(item.logprobs)
        text = choice.detok.push(item.new_token_ids)
        if choice.detok.stopped:
            choice.finish_reason = "stop"
            self.client.abort_nowait([choice.request_id])
        elif item.finish_reason is not None:
            text += choice.detok.finish()
            choice.finish_reason = item.finish_reason
        if choice.finish_reason is not None:
            self._record(choice)
        return Delta(choice, text, item.new_token_ids, item.logprobs or [])

    def _record(self, choice: Choice) -> None:
        ttft = choice.first_token_at - self.arrival if choice.first_token_at is not None else None
        self.metrics.request_finished(
            self.served.name,
            choice.finish_reason or "stop",
            len(self.prompts[choice.prompt_index]),
            choice.num_tokens,
            ttft,
            time.monotonic() - self.arrival,
            choice.queue_seconds,
        )

    def abort(self, reason: str) -> None:
        """Drop every unfinished choice in the worker now (no await: safe while being cancelled)."""
        live = [c.request_id for c in self.choices if c.finish_reason is None]
        if live:
            self.client.abort_nowait(live)
            self.metrics.aborted.labels(self.served.name, reason).inc(len(live))
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"

    def close(self) -> None:
        """Ends the generation, aborting whatever is unfinished; safe to call more than once, and before `start`
        (nothing is submitted then)."""
        if self._done:
            return
        self._done = True
        if self._started and any(c.finish_reason is None for c in self.choices):
            self.abort("client_disconnect")
        for task in self._tasks:
            task.cancel()


def _check_vocabulary(params: SamplingParams, vocab: int) -> None:
    """Token ids the worker would refuse, refused here with the field named, before anything is queued."""
    for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab]
        if bad:
            message = f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            raise APIError.invalid_request(message, param=name, code="invalid_value")


async def watch_disconnect(receive: object) -> None:
    """Returns when the ASGI client disconnects (for non-streaming requests, whose body is already read)."""
    while True:
        message = await receive()  # type: ignore[operator]
        if message.get("type") == "http.disconnect":
            return


class GenerationStream(StreamingResponse):
    """The SSE response of a generation. It starts the generation when the response starts, and closes it (aborting
    what is unfinished) however the response ends: streamed to the end, client gone, or cancelled. Starlette cancels
    a stream whose client left wherever it waits, often outside the body generator, whose own cleanup then waits
    for garbage collection; requests must not keep running until then."""

    def __init__(self, generation: Generation, body: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.generation.start()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: object) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(watch_disconnect(receive))
    try:
        yield task
    finally:
        task.cancel()

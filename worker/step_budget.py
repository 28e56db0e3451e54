"""`StepBudget`: how many prompt tokens a step may carry while other requests decode, from measured costs.

A step is as long as its slowest part, and every decoding stream waits for the whole step before its next token.
A 2,048-token chunk of a 1B model on a CPU lasts about 15 s, so a fixed token budget that suits one model freezes
every stream of another. Here the chunk is sized by time instead: while requests decode, the prompt tokens of a step
may cost at most `ratio` times a decode-only step of the same rows, so the gap between two tokens of a stream stays
within about `1 + ratio` times its gap without prompts arriving. With nobody decoding nothing waits on the step, and
prompts take the whole `max_num_batched_tokens`.

Costs are measured, not guessed. A step is priced as a fixed part (Python, reading the weights once) plus a cost per
decoding stream and a cost per prompt token, each an exponential moving average: the fixed part from steps of a few
rows, a stream's from decode-only steps less the fixed part, a prompt token's from steps with prompts less the other
two. They follow the model, the dtype, the threads and the machine, and a prompt token's cost follows context length
too (attention over a long prompt's later chunks costs more a token). A decode step is priced by the streams it
carries: under steady load prompts always wait and no step is decode-only, and a budget priced from the decode-only
steps of the first seconds, when few streams ran, shrank every chunk to 16 tokens and halved the throughput of 32
streams of 256-token prompts. Until a decode-only step of several streams has been seen, a stream costs what a
prompt token does: on a CPU both are rows of the same projections (SmolLM2 in bf16 on 2 cores: a step of one decode
18 ms, of 32 decodes 48 ms, about 1 ms a stream, and a 2,048-token prompt step 0.85 ms a token).

The reference is the decode step of every request that is there, not only of those decoding now: requests that
wait, or are part-way through their prompts, decode beside the others as soon as their prompts are in, and the gap
between tokens becomes that step's anyway. Priced by the decoding streams alone, a step of one or two streams
allowed a few dozen prompt tokens while seven 1,024-token prompts waited (vLLM's `bench serve`, random 1,024/16,
c=8, SmolLM2 bf16, 2 cores: 1,101-1,144 prompt tokens/s in two runs, 1,159-1,242 with the waiting counted, inter-token
p99 unchanged at 67-72 ms). Pure Python: the scheduler asks it, the engine feeds it.
"""

from __future__ import annotations

SMOOTHING = 0.3  # weight of the newest step in each moving average
FIXED_ROWS = 4  # steps of at most this many rows (streams and prompt tokens) price the fixed part
MIN_ROWS = 8  # fewer streams, or prompt tokens, are too noisy to price one
# Before a small step has been seen, a step's fixed part is taken as this
FALLBACK_FIXED_SECONDS = 0.02


class StepBudget:
    def __init__(self, max_num_batched_tokens: int, ratio: float, min_chunk: int = 8) -> None:
        """`ratio` 0 turns the bound off: prompts always get the whole token budget. `min_chunk`: the fewest prompt
        tokens a step carries, so a prompt always advances; a token of SmolLM2 at 4,000 tokens of context costs about
        3 ms, and a floor of 16 alone took a step of 8 streams past 3x its decode-only length."""
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ratio = ratio
        self.min_chunk = min(min_chunk, max_num_batched_tokens)
        self.fixed_seconds: float | None = None  # a step's cost beyond its rows
        self.stream_seconds: float | None = None  # one decoding stream
        self.token_seconds: float | None = None  # one prompt token

    @property
    def fixed(self) -> float:
        return FALLBACK_FIXED_SECONDS if self.fixed_seconds is None else self.fixed_seconds

    def decode_seconds(self, decodes: int) -> float | None:
        """The estimated cost of a decode-only step of `decodes` streams; None before anything has been priced."""
        stream = self.stream_seconds if self.stream_seconds is not None else self.token_seconds
        return None if stream is None else self.fixed + decodes * stream

    def prompt_tokens(self, decodes: int, joining: int = 0) -> int:
        """The most prompt tokens the next step may carry; `decodes`: the decoding streams it also carries;
        `joining`: requests admitted but not yet decoding, or waiting, that will decode beside them."""
        decode = self.decode_seconds(decodes + joining)
        if not decodes or self.ratio <= 0 or decode is None or self.token_seconds is None:
            return self.max_num_batched_tokens
        allowance = self.ratio * decode
        return max(self.min_chunk, min(self.max_num_batched_tokens, int(allowance / self.token_seconds)))

    def describe(self) -> str:
        """The costs as priced now, for a debug log."""
        ms = [
            "-" if x is None else f"{x * 1e3:.2f} ms"
            for x in (self.fixed_seconds, self.stream_seconds, self.token_seconds)
        ]
        return f"priced: fixed {ms[0]}, a stream {ms[1]}, a prompt token {ms[2]}"

    def observe(self, prompt_tokens: int, decodes: int, seconds: float) -> None:
        """Fold in a finished step: how many prompt tokens and decode rows it ran, and how long it took."""
        rows = prompt_tokens + decodes
        if 0 < rows <= FIXED_ROWS:
            stream = self.stream_seconds or self.token_seconds or 0.0
            rest = prompt_tokens * (self.token_seconds or 0.0) + decodes * stream
            self.fixed_seconds = _blend(self.fixed_seconds, max(seconds - rest, seconds / 2))
        elif prompt_tokens == 0 and decodes >= MIN_ROWS:
            self.stream_seconds = _blend(self.stream_seconds, max(seconds - self.fixed, seconds / 2) / decodes)
        elif prompt_tokens >= MIN_ROWS:
            decode = self.decode_seconds(decodes) if decodes else self.fixed
            if decode is None:  # nothing priced yet: the streams count as prompt tokens
                decode, prompt_tokens = self.fixed, rows
            self.token_seconds = _blend(self.token_seconds, max(seconds - decode, seconds / 2) / prompt_tokens)


def _blend(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value

"""`StepBudget`: how many prompt tokens a step may carry while other requests decode, from measured costs.

A step is as long as its slowest part, and every decoding stream waits for the whole step before its next token.
A 2,048-token chunk of a 1B model on a CPU lasts about 15 s, so a fixed token budget that suits one model freezes
every stream of another. Here the chunk is sized by time instead: while requests decode, the prompt tokens of a step
may cost at most `ratio` times a decode-only step, so the gap between two tokens of a stream stays within about
`1 + ratio` times its gap without prompts arriving. With nobody decoding nothing waits on the step, and prompts take
the whole `max_num_batched_tokens`.

Costs are measured, not guessed: a decode-only step's time, and the time per prompt token beyond it, each an
exponential moving average over recent steps. Both follow the model, the dtype, the threads and the machine, and the
per-token cost follows context length too (attention over a long prompt's later chunks costs more a token).
Pure Python: the scheduler asks it, the engine feeds it.
"""

from __future__ import annotations

SMOOTHING = 0.3  # weight of the newest step in each moving average
MIN_PROMPT_TOKENS = 8  # steps with fewer prompt tokens are too noisy to price a prompt token
# Before a decode-only step has been seen, a step's fixed part (Python, reading the weights once) is taken as this
FALLBACK_DECODE_SECONDS = 0.02


class StepBudget:
    def __init__(self, max_num_batched_tokens: int, ratio: float, min_chunk: int = 16) -> None:
        """`ratio` 0 turns the bound off: prompts always get the whole token budget."""
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ratio = ratio
        self.min_chunk = min(min_chunk, max_num_batched_tokens)
        self.decode_seconds: float | None = None  # a decode-only step
        self.token_seconds: float | None = None  # one prompt token, beyond a decode-only step

    def prompt_tokens(self, decoding: bool) -> int:
        """The most prompt tokens the next step may carry; `decoding`: it also carries decodes."""
        if not decoding or self.ratio <= 0 or self.token_seconds is None:
            return self.max_num_batched_tokens
        allowance = self.ratio * (self.decode_seconds or FALLBACK_DECODE_SECONDS)
        return max(self.min_chunk, min(self.max_num_batched_tokens, int(allowance / self.token_seconds)))

    def observe(self, prompt_tokens: int, decodes: int, seconds: float) -> None:
        """Fold in a finished step: how many prompt tokens and decode rows it ran, and how long it took."""
        if prompt_tokens == 0:
            if decodes:
                self.decode_seconds = _blend(self.decode_seconds, seconds)
            return
        if prompt_tokens < MIN_PROMPT_TOKENS:
            return
        fixed = self.decode_seconds if self.decode_seconds is not None else 0.0
        per_token = max(seconds - fixed, seconds / 2) / prompt_tokens
        self.token_seconds = _blend(self.token_seconds, per_token)


def _blend(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value

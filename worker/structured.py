"""`GrammarMasks`: the worker's side of structured outputs. One llguidance matcher per constrained request; each step
the allowed-token masks of the rows to sample are computed on a helper thread while the model runs (llguidance drops
the GIL), then applied to the logits before sampling, and every sampled token advances its matcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from worker.grammar import check
from worker.messages import InvalidRequest, StructuredOutput

log = logging.getLogger("tokenmill.structured")

_BITS = torch.arange(32, dtype=torch.int32)


@dataclass
class MaskBatch:
    """Allowed tokens of the constrained rows of one step: bool [rows, vocab], and how long computing it took."""

    request_ids: list[str]
    allowed: torch.Tensor
    seconds: float


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words, one bit per token (llguidance's layout), to bool [rows, vocab_size]."""
    bits = (bitmask[:, :, None] >> _BITS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class GrammarMasks:
    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: LLTokenizer | None = None  # built on the first constrained request (about a second)
        self._executor = LLExecutor()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
        self.matchers: dict[str, LLMatcher] = {}
        self.mask_seconds = 0.0  # cumulative: computing masks (overlapped with the forward)
        self.wait_seconds = 0.0  # cumulative: the step waiting for masks after its forward

    def _llg_tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            from llguidance.hf import from_tokenizer
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            hf = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            if not isinstance(hf, PreTrainedTokenizerFast):
                raise InvalidRequest("response_format", "structured outputs need a fast (tokenizers) tokenizer")
            self._tokenizer = from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
        return self._tokenizer

    def add(self, request_id: str, structured: StructuredOutput) -> None:
        """Compile the request's grammar against the tokenizer; InvalidRequest when it does not compile."""
        matcher = LLMatcher(self._llg_tokenizer(), check(structured), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(structured.param, f"cannot be enforced: {matcher.get_error()}")
        self.matchers[request_id] = matcher

    def release(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def start(self, request_ids: Sequence[str]) -> Future[MaskBatch] | None:
        """Begin computing the masks of the constrained ones among `request_ids` on the helper thread."""
        wanted = [rid for rid in request_ids if rid in self.matchers]
        if not wanted:
            return None
        return self._thread.submit(self._compute, wanted)

    def _compute(self, request_ids: list[str]) -> MaskBatch:
        start = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros((len(request_ids), words), dtype=torch.int32)
        pairs = [(self.matchers[rid], row) for row, rid in enumerate(request_ids)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(request_ids))
        allowed = unpack(bitmask, self.vocab_size)
        return MaskBatch(request_ids, allowed, time.perf_counter() - start)

    def finish(self, pending: Future[MaskBatch] | None) -> dict[str, torch.Tensor]:
        """Wait for the masks begun by `start`; each constrained row's bool [vocab] of allowed tokens."""
        if pending is None:
            return {}
        start = time.perf_counter()
        batch = pending.result()
        self.wait_seconds += time.perf_counter() - start
        self.mask_seconds += batch.seconds
        return dict(zip(batch.request_ids, batch.allowed, strict=True))

    def error(self, request_id: str) -> str | None:
        matcher = self.matchers.get(request_id)
        return matcher.get_error() if matcher is not None and matcher.is_error() else None

    def advance(self, request_id: str, token_id: int) -> str | None:
        """Feed a sampled token to the request's matcher; the matcher's error if it refuses it."""
        matcher = self.matchers.get(request_id)
        if matcher is None or matcher.consume_token(token_id):
            return None
        return matcher.get_error() or f"token {token_id} does not fit the grammar"

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

"""`GrammarMasks`: the worker's side of structured outputs. One llguidance matcher per constrained request, compiled
on a thread of its own (a hostile grammar's first mask can take a second even within the limits, and the step must
not wait for it); each step the allowed-token masks of the rows to sample are computed on a helper thread while the
model runs (llguidance drops the GIL), then applied to the logits before sampling, and every sampled token advances
its matcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from worker.grammar import GrammarThreads, compile_matcher, to_grammar, validate
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
        self._compiler = GrammarThreads(1, "tokenmill-grammar-compile")
        self.compiling: dict[str, Future[LLMatcher]] = {}
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
        """Turn the constraint into a grammar (InvalidRequest at once if it cannot be one) and start compiling it
        against the tokenizer; `compiled` hands the request back when that is done, or failed."""
        grammar = to_grammar(structured)
        self.compiling[request_id] = self._compiler.submit(self._compile, structured, grammar)

    def _compile(self, structured: StructuredOutput, grammar: str) -> LLMatcher:
        try:
            return compile_matcher(self._llg_tokenizer(), structured, validate(structured, grammar))
        except InvalidRequest:
            raise
        except Exception as exc:  # the tokenizer would not load, say: still this request's problem alone
            raise InvalidRequest(structured.param, f"cannot be enforced by this model: {exc}") from exc

    def compiled(self, timeout: float = 0.0) -> list[tuple[str, InvalidRequest | None]]:
        """The requests whose grammar finished compiling since the last call, each with its error if it failed.
        Waits up to `timeout` seconds for the first when none is done yet."""
        if timeout > 0 and self.compiling:
            wait(self.compiling.values(), timeout, return_when=FIRST_COMPLETED)
        done: list[tuple[str, InvalidRequest | None]] = []
        for request_id, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            error = future.exception()
            assert error is None or isinstance(error, InvalidRequest)  # `_compile` turns any failure into one
            if error is None:
                self.matchers[request_id] = future.result()
            done.append((request_id, error))
        return done

    def release(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        future = self.compiling.pop(request_id, None)
        if future is not None:
            future.cancel()

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
        self._compiler.shutdown()

"""`GrammarCheck`: a request's structured-output constraint, compiled and tried against the model's tokenizer before
the request is queued (worker.grammar.probe). It runs on two deep-stacked threads of its own, never on the event loop
nor in the way of chat templates, bounded by llguidance's limits and the probe's; a constraint that cannot be enforced,
or is too complex to, is a 400 before any byte of the reply, and never reaches the worker's step.
"""

from __future__ import annotations

import asyncio

from app.errors import APIError
from app.model_pool import ServedModel
from worker.grammar import GrammarThreads, probe
from worker.messages import InvalidRequest, StructuredOutput

THREADS = 2


class GrammarCheck:
    def __init__(self, threads: int = THREADS) -> None:
        self._threads = GrammarThreads(threads, "tokenmill-grammar-check")

    async def __call__(self, served: ServedModel, structured: StructuredOutput | None) -> None:
        """Nothing, or APIError 400 (code `invalid_grammar`) saying what is wrong with the constraint."""
        if structured is not None:
            await asyncio.wrap_future(self._threads.submit(_check, served, structured))


def _check(served: ServedModel, structured: StructuredOutput) -> None:
    tokenizer = served.tokenizer
    assert tokenizer is not None
    try:
        probe(tokenizer.grammar_tokenizer(served.info.vocab_size, served.info.eos_token_ids), structured)
    except InvalidRequest as exc:
        message = f"the tools' parameters cannot be enforced: {exc}" if exc.param == "tools" else str(exc)
        raise APIError.invalid_request(message, exc.param, "invalid_grammar") from exc
    except Exception as exc:  # llguidance refusing the tokenizer, say: the worker would refuse it too
        message = f"{structured.param} cannot be enforced by this model: {exc}"
        raise APIError.invalid_request(message, structured.param, "invalid_grammar") from exc

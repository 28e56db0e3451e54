"""What `/v1/embeddings` adds to the serving path: its inputs as token ids (truncated where the request asks), the
`dimensions` a model allows, and each vector as JSON floats or OpenAI's base64 of float32 values.

Vectors cross from the worker as float32 bytes; a shortened one is cut and, where the model's vectors have unit
length, scaled back to it (as OpenAI's and vLLM's shortened embeddings are).
"""

from __future__ import annotations

import asyncio
import base64
import math
from array import array

from app.errors import APIError
from app.tokenizer import Tokenizer
from worker.messages import ModelInfo


def check_dimensions(info: ModelInfo, model: str, dimensions: int | None) -> None:
    """400 (param 'dimensions') unless the model gives vectors of this size."""
    if dimensions is None or dimensions == info.embedding_size:
        return
    allowed = info.matryoshka_dimensions
    if allowed is None:
        message = (
            f"model '{model}' does not support 'dimensions': its vectors have {info.embedding_size} values, and it "
            "is not trained for shorter ones (set matryoshka_dimensions in models.yaml if it is)"
        )
    elif dimensions > info.embedding_size:
        message = f"'dimensions' is {dimensions}; model '{model}' gives at most {info.embedding_size}"
    elif allowed and dimensions not in allowed:
        sizes = ", ".join(str(d) for d in allowed)
        message = f"'dimensions' is {dimensions}; model '{model}' gives vectors of {sizes} or {info.embedding_size}"
    else:
        return
    raise APIError.invalid_request(message, param="dimensions")


async def input_token_ids(
    tokenizer: Tokenizer, inputs: list[str | list[int]], info: ModelInfo, truncate: int | None
) -> list[list[int]]:
    """Each input as token ids: texts with the model's special tokens, ids as sent. `truncate` (vLLM's
    truncate_prompt_tokens; -1 the model's limit) keeps each input's last tokens; without it an input over the
    limit is a 400 `context_length_exceeded`. Tokenizing runs off the event loop."""
    limit = info.max_model_len
    keep = limit if truncate == -1 else truncate
    if keep is not None and keep > limit:
        message = f"'truncate_prompt_tokens' is {keep}; this model takes inputs of at most {limit} tokens"
        raise APIError.invalid_request(message, param="truncate_prompt_tokens")

    def prepare() -> list[list[int]]:
        texts = [item for item in inputs if isinstance(item, str)]
        encoded = iter(tokenizer.encode_batch(texts) if keep is None else tokenizer.encode_truncated(texts, keep))
        ids = [next(encoded) if isinstance(item, str) else item[-keep:] if keep else item for item in inputs]
        bad = [t for item in ids for t in item if t >= info.vocab_size]
        if bad:
            message = f"input has token ids outside the vocabulary [0, {info.vocab_size}): {bad[:5]}"
            raise APIError.invalid_request(message, param="input")
        longest = max(len(item) for item in ids)
        if longest > limit:
            raise APIError.context_length_exceeded(limit, longest, param="input")
        return ids

    return await asyncio.to_thread(prepare)


def vector(raw: bytes, dimensions: int | None, normalized: bool, encoding_format: str) -> list[float] | str:
    """A worker's float32 vector as the reply carries it: cut to `dimensions` (renormalized if `normalized`), then
    a list of floats or the base64 of its little-endian float32 bytes."""
    values = array("f", raw)
    if dimensions is not None and dimensions < len(values):
        values = values[:dimensions]
        norm = math.sqrt(math.fsum(v * v for v in values)) if normalized else 0.0
        if norm > 0:
            values = array("f", (v / norm for v in values))
    return base64.b64encode(values.tobytes()).decode() if encoding_format == "base64" else values.tolist()

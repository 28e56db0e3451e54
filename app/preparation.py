"""Request preparation off the event loop: chat templates and tokenizing run in a worker thread, so a large body
never stalls the loop that serves every other request.

Tokenizing goes through the tokenizer's batch call, which releases the GIL while it works (`Tokenizer.encode_batch`).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import msgspec

from app.errors import APIError
from app.tokenizer import Tokenizer


async def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)


async def decode(tokenizer: Tokenizer, token_ids: list[int]) -> str:
    """The text of these ids, special tokens included (the batch call releases the GIL too)."""
    texts = await asyncio.to_thread(tokenizer.fast.decode_batch, [token_ids], skip_special_tokens=False)
    return str(texts[0])


async def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
    """The conversation through the model's chat template, with the generation prompt, as token ids (the template
    writes the special tokens itself). Raises `ChatTemplateError`."""
    return await asyncio.to_thread(tokenizer.apply_chat_template, messages, True, **extra)


async def completion_prompts(tokenizer: Tokenizer, prompts: list[str | list[int]], vocab: int) -> list[list[int]]:
    """Each prompt of a completions request as token ids (texts tokenized, id lists checked against the vocabulary).
    Raises `APIError` (400, param 'prompt') for an empty prompt or an id outside the vocabulary."""

    def prepare() -> list[list[int]]:
        encoded = iter(tokenizer.encode_batch([p for p in prompts if isinstance(p, str)]))
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        if any(not p for p in ids):
            raise APIError.invalid_request("prompt is empty", param="prompt")
        if any(t >= vocab for p in ids for t in p):
            message = f"prompt has token ids outside the vocabulary [0, {vocab})"
            raise APIError.invalid_request(message, param="prompt")
        return ids

    return await asyncio.to_thread(prepare)


class _PromptProbe(msgspec.Struct):
    prompt: msgspec.Raw = msgspec.Raw(b"")  # /v1/completions
    input: msgspec.Raw = msgspec.Raw(b"")  # /v1/embeddings


_JSON = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def count_prompts(body: bytes, limit: int) -> int | None:
    """How many prompts a /v1/completions body batches (or inputs a /v1/embeddings body), counting no further than
    `limit` + 1, before the body is validated: a 4 MiB body holds a million prompts, and building them all would
    hold the event loop for about a second. None: no batch (a string, a list of ids) or not JSON, which validation
    then reports.

    msgspec checks the JSON and finds the prompt without building anything; then the batch's first prompts are
    decoded one by one, and the count stops past the limit."""
    try:
        probe = msgspec.json.decode(body, type=_PromptProbe)
        text = bytes(probe.prompt or probe.input).decode()
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return None
    if not text.startswith("["):
        return None
    count, index = 0, _skip_space(text, 1)
    while count <= limit and text[index] != "]":
        item, index = _JSON.raw_decode(text, index)
        if not isinstance(item, str | list):
            return None  # token ids: one prompt
        count += 1
        index = _skip_space(text, index)
        if text[index] == ",":
            index = _skip_space(text, index + 1)
    return count


def _skip_space(text: str, index: int) -> int:
    match = _SPACE.match(text, index)
    return match.end() if match else index


def too_many_prompts(cap: int, count: int | None = None, param: str = "prompt") -> APIError:
    """`param`: prompt (completions) or input (embeddings)."""
    batch = f"a batch of {count} {param}s" if count is not None else f"a batch of more than {cap} {param}s"
    message = f"{param} is {batch}; at most {cap} are accepted in one request"
    return APIError.invalid_request(message, param=param, code="too_many_prompts")

"""Engine logprobs (token ids and numbers) rendered in OpenAI's two shapes, chat's `content` list and the legacy
completions lists (an echoed prompt's tokens first where asked), and prompt logprobs in vLLM's shape. Token text and
bytes come from the request's detokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from app.detokenizer import DetokenizerTokenizer, IncrementalDetokenizer
from app.protocol_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TopLogprob,
)
from worker.messages import SampleLogprobs


def chat_logprobs(detok: IncrementalDetokenizer, items: list[SampleLogprobs]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob(
            token=detok.token_text(item.chosen.token_id),
            logprob=item.chosen.logprob,
            bytes=detok.token_bytes(item.chosen.token_id),
            top_logprobs=[
                TopLogprob(
                    token=detok.token_text(alt.token_id), logprob=alt.logprob, bytes=detok.token_bytes(alt.token_id)
                )
                for alt in item.top
            ],
        )
        for item in items
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(
    detok: IncrementalDetokenizer, items: list[SampleLogprobs], first: int, echo_chars: int
) -> CompletionLogprobs:
    """`items` are the logprobs of the sequence's tokens `first`, `first + 1`, ...; each token's text_offset is where
    its text begins in the choice's text (after `echo_chars` of echoed prompt), as the detokenizer recorded it."""
    out = CompletionLogprobs()
    items = items[: max(0, len(detok.token_offsets) - first)]  # none for tokens after a stop string
    for index, item in enumerate(items, start=first):
        _append(out, detok, item.chosen.token_id, item, len(item.top), echo_chars + detok.token_offsets[index])
    return out


def echo_logprobs(
    tokenizer: DetokenizerTokenizer,
    detok: IncrementalDetokenizer,
    prompt: Sequence[int],
    items: Sequence[SampleLogprobs | None],
    k: int,
    echo: str,
) -> CompletionLogprobs:
    """The legacy lists of an echoed prompt: each prompt token's logprob and its top `k` alternatives (null for the
    first token, which has no context), at its offset in the echoed text `echo`."""
    out = CompletionLogprobs()
    offsets = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    offsets.push(prompt)
    for token_id, item, offset in zip(prompt, items, offsets.token_offsets, strict=True):
        _append(out, detok, token_id, item, k, min(offset, len(echo)))
    return out


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def _append(
    out: CompletionLogprobs, detok: IncrementalDetokenizer, token_id: int, item: SampleLogprobs | None, k: int, at: int
) -> None:
    token = detok.token_text(token_id)
    out.tokens.append(token)
    out.text_offset.append(at)
    if item is None:
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        return
    out.token_logprobs.append(item.chosen.logprob)
    top = {detok.token_text(alt.token_id): alt.logprob for alt in item.top[:k]}
    top.setdefault(token, item.chosen.logprob)  # OpenAI: the sampled token is always there (up to k + 1)
    out.top_logprobs.append(top)


def vllm_prompt_logprobs(
    detok: IncrementalDetokenizer, items: Sequence[SampleLogprobs | None], k: int
) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token, by token id, the token itself (its rank as computed) and the top `k`
    (ranks 1 to k)."""
    out: PromptLogprobs = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        chosen = item.chosen
        entry = {str(chosen.token_id): _prompt_entry(detok, chosen.token_id, chosen.logprob, item.rank)}
        for rank, alt in enumerate(item.top[:k], start=1):
            entry.setdefault(str(alt.token_id), _prompt_entry(detok, alt.token_id, alt.logprob, rank))
        out.append(entry)
    return out


def _prompt_entry(detok: IncrementalDetokenizer, token_id: int, logprob: float, rank: int) -> PromptTokenLogprob:
    return PromptTokenLogprob(logprob=logprob, rank=rank, decoded_token=detok.token_text(token_id))

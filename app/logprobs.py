"""Engine logprobs (token ids and numbers) rendered in OpenAI's two shapes: chat's `content` list and the legacy
completions lists. Token text and bytes come from the request's detokenizer."""

from __future__ import annotations

from app.detokenizer import IncrementalDetokenizer
from app.protocol_responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
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
        token = detok.token_text(item.chosen.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(item.chosen.logprob)
        top = {detok.token_text(alt.token_id): alt.logprob for alt in item.top}
        top.setdefault(token, item.chosen.logprob)  # OpenAI: the sampled token is always there (up to k + 1)
        out.top_logprobs.append(top)
        out.text_offset.append(echo_chars + detok.token_offsets[index])
    return out

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


def completion_logprobs(detok: IncrementalDetokenizer, items: list[SampleLogprobs], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for item in items:
        token = detok.token_text(item.chosen.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(item.chosen.logprob)
        top = {detok.token_text(alt.token_id): alt.logprob for alt in item.top}
        top.setdefault(token, item.chosen.logprob)  # OpenAI: the sampled token is always there (up to k + 1)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out

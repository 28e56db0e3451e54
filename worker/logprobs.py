"""Logprobs of given tokens in rows of raw logits, with each row's top alternatives: the sampler's of generated tokens
and the engine's of prompt tokens (`worker.prompt_logprobs`) are the same computation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.messages import SampleLogprobs, TokenLogprob


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int], *, ranks: bool = False
) -> list[SampleLogprobs]:
    """Row i: the float32 log-softmax of `logits[i]` at `token_ids[i]`, and its `ks[i]` most likely tokens; with
    `ranks`, the token's rank too: how many tokens are at least as likely, itself included (vLLM's rank)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    values = chosen[:, 0].tolist()
    rank = (logprobs >= chosen).sum(dim=-1).tolist() if ranks else [0] * len(values)
    max_k = max(ks, default=0)
    top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (logprobs[:, :0], logprobs[:, :0].long())
    alternatives, ids = top_values.tolist(), top_ids.tolist()
    return [
        SampleLogprobs(
            TokenLogprob(token, value),
            [TokenLogprob(t, v) for t, v in zip(ids[i][:k], alternatives[i][:k], strict=True)],
            rank[i],
        )
        for i, (token, value, k) in enumerate(zip(token_ids.tolist(), values, ks, strict=True))
    ]

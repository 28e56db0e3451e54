"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's logprob given the tokens before it, from the raw
logits of the position before it, computed once per position whatever the chunking or preemption.

A step's chunk of a request feeds positions [first, first + n); position p's logits score prompt token p + 1. Positions
already scored (before a preemption) are not scored again, and the last prompt position predicts the first generated
token, not a prompt one.
"""

from __future__ import annotations

import torch

from worker.logprobs import token_logprobs
from worker.messages import SampleLogprobs
from worker.model_runner import BatchItem
from worker.sequence import Sequence

ROWS_AT_ONCE = 512  # rows log-softmaxed together: a float32 copy of [rows, vocab] each, not of the whole chunk


def score_rows(seq: Sequence, first: int, num_new: int) -> range:
    """Offsets into this step's tokens of `seq` (from position `first`) whose logits score prompt tokens not yet
    scored."""
    if not seq.scoring_prompt:
        return range(0)
    start = max(first, len(seq.prompt_logprobs))
    stop = min(first + num_new, seq.num_prompt_tokens - 1)
    return range(start - first, max(start, stop) - first)


def split_scores(
    logits: torch.Tensor, items: list[BatchItem], seqs: list[Sequence]
) -> tuple[torch.Tensor, dict[str, list[SampleLogprobs]]]:
    """The logits of a step's sampling rows (with a decode's rows of proposed tokens), and the prompt logprobs its
    scored rows give, by request. `logits` are what `ModelRunner.execute(items)` returned; `seqs` the items'
    sequences."""
    sample: list[int] = []  # the rows of each item that samples
    scores: dict[str, list[SampleLogprobs]] = {}
    offset = 0
    for item, seq in zip(items, seqs, strict=True):
        rows = range(offset, offset + len(item.score_rows))
        if rows and seq.scoring_prompt:
            scores[seq.request_id] = score(logits, rows, seq, item.num_computed + item.score_rows.start)
        elif rows:  # a decode's kept rows before its last: those of the proposed tokens it verifies
            sample.extend(rows)
        offset += len(rows)
        if item.sample:
            sample.append(offset)
            offset += 1
    if scores and sample:
        logits = logits[torch.tensor(sample, device=logits.device)]
    return logits, scores


def score(logits: torch.Tensor, rows: range, seq: Sequence, first_row: int) -> list[SampleLogprobs]:
    """The logprobs of the prompt tokens that `rows` of `logits` score; the first of them is the logits of position
    `first_row` of `seq`."""
    k = seq.params.prompt_logprobs or 0
    out: list[SampleLogprobs] = []
    for start in range(0, len(rows), ROWS_AT_ONCE):
        part = rows[start : start + ROWS_AT_ONCE]
        position = first_row + start + 1
        targets = torch.tensor(seq.token_ids[position : position + len(part)], device=logits.device)
        out.extend(token_logprobs(logits[part.start : part.stop], targets, [k] * len(part), ranks=True))
    return out

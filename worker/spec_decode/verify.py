"""Which proposed tokens a step keeps, so that speculation never changes what a request would have produced.

A request that fed k proposed tokens `d_1..d_k` after its own last token has k + 1 rows of logits: row i is the
distribution of the token after `d_1..d_i`. Its penalties and min_tokens count the proposed tokens before it as
output, as they will be once kept.

- Greedy: `d_i` is kept while it is row i's own choice; the first row whose choice differs yields that choice, and
  if every proposed token is kept the last row yields one more. The output is token for token the unspeculated one.
- Sampling: the proposer is deterministic, a draft distribution that puts all its mass on `d_i`, and speculative
  sampling's rule (Leviathan et al., Chen et al.) then reads: keep `d_i` with probability p_i(d_i); on the first
  rejection draw from p_i with `d_i` removed and renormalized; after k kept tokens draw from the last row. Each
  emitted token is distributed exactly as p_i, with the same filters (temperature, top_k, top_p, min_p) as a plain
  step. The numbers come from the request's own generator where it has a seed, so a seeded request repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker import native
from worker.messages import SampleLogprobs
from worker.sampler import SampleInput, Sampler, inverse_cdf, process_logits, sample_logprobs, sampling_logits

_NEG_INF = float("-inf")


@dataclass
class Verified:
    token_ids: list[int]  # the kept proposed tokens, then the one the model chose after them
    logprobs: list[SampleLogprobs] | None  # one per token where the request asked for logprobs


def verify(
    sampler: Sampler, raw: torch.Tensor, rows: Sequence[SampleInput], drafts: Sequence[Sequence[int]]
) -> list[Verified]:
    """`raw`: float32 logits, `len(drafts[g]) + 1` consecutive rows for group g (a request), `rows` likewise."""
    x = process_logits(raw, rows)
    best = native.argmax(x)
    live = x.gather(1, best[:, None])[:, 0] > _NEG_INF  # a row with nothing left falls back to the raw argmax
    choice = torch.where(live, best, native.argmax(raw)).tolist()
    live_rows: list[bool] = live.tolist()
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy and live_rows[i]]
    probs: dict[int, torch.Tensor] = {}
    if sampled:
        index = torch.tensor(sampled, device=x.device)
        for i, p in zip(sampled, sampling_logits(x[index], [rows[i] for i in sampled]).softmax(dim=-1), strict=True):
            probs[i] = p

    out: list[Verified] = []
    start = 0
    for proposed in drafts:
        emitted: list[int] = []
        for offset, token in enumerate([*proposed, None]):
            i = start + offset
            p = probs.get(i)
            if p is None:  # greedy (or nothing left to draw from): the row's own choice
                emitted.append(choice[i])
                if choice[i] != token:
                    break
                continue
            u = float(sampler.uniform(rows[i]))
            if token is not None and u < float(p[token]):
                emitted.append(token)
                continue
            if token is not None:  # rejected: draw from what is left once the proposed token is taken out
                p = p.clone()
                p[token] = 0.0
                u = float(sampler.uniform(rows[i]))
            emitted.append(int(inverse_cdf(p[None], torch.tensor([u], dtype=torch.float64, device=p.device))[0]))
            break
        used = range(start, start + len(emitted))
        wanted = rows[start].params.logprobs is not None
        logprobs = None
        if wanted:
            tokens = torch.tensor(emitted, device=raw.device)
            scored = sample_logprobs(raw[start : used.stop], tokens, rows[start : used.stop])
            logprobs = [item for item in scored if item is not None]
        out.append(Verified(emitted, logprobs))
        start += len(proposed) + 1
    return out

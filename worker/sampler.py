"""Turns a batch of logits into one token per request, with the OpenAI/HF knobs applied row by row but vectorized.

Seeded requests draw noise from their own generator, so their tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from worker import native
from worker.logprobs import token_logprobs
from worker.messages import SampleLogprobs, SamplingParams
from worker.transfers import to_device

_NEG_INF = float("-inf")
_MIN_TEMPERATURE = 1e-5  # dividing by a smaller temperature overflows float32 logits to inf, and softmax to NaN


@dataclass
class SampleInput:
    request_id: str
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    suppress_token_ids: Sequence[int]  # token ids banned at this step (EOS/stop ids while under min_tokens)
    allowed: torch.Tensor | None = None  # bool [vocab]: the only tokens a structured output's grammar allows now


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampleLogprobs | None]  # None for rows whose params.logprobs is None


def _flat_keys(seqs: Sequence[Sequence[int]], row_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """`row * vocab + token` keys into a flattened [rows, vocab] tensor; out-of-vocabulary ids are dropped,
    so a bad id never crashes a step. Touching only these keys keeps each stage O(tokens), not O(rows * vocab)."""
    tokens = torch.from_numpy(np.fromiter(chain.from_iterable(seqs), dtype=np.int64))
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long), torch.tensor([len(s) for s in seqs]))
    ok = (tokens >= 0) & (tokens < vocab)
    keys = rows * vocab + tokens
    return to_device(keys if bool(ok.all()) else keys[ok], device)


def _per_row(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return _per_row(values, device)[:, None]


def process_logits(logits: torch.Tensor, rows: Sequence[SampleInput]) -> torch.Tensor:
    """float32 logits after bias, suppression, penalties and grammar masks; a new tensor when any stage applies, the
    input never modified. Each stage is skipped when no row uses it and touches only the rows that do."""
    bias = [i for i, r in enumerate(rows) if r.params.logit_bias]
    suppress = [i for i, r in enumerate(rows) if r.suppress_token_ids]
    repetition = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    frequency = [i for i, r in enumerate(rows) if r.params.frequency_penalty or r.params.presence_penalty]
    masks = [(i, r.allowed) for i, r in enumerate(rows) if r.allowed is not None]
    if not (bias or suppress or repetition or frequency or masks):
        return logits.float()
    x = logits.to(torch.float32, copy=True).contiguous()
    vocab, device = x.shape[-1], x.device
    flat = x.view(-1)
    if bias:
        items = [(i * vocab + t, b) for i in bias for t, b in rows[i].params.logit_bias.items() if 0 <= t < vocab]
        if items:
            bias_keys, bias_values = zip(*items, strict=True)
            flat.index_add_(0, to_device(torch.tensor(bias_keys), device), _per_row(bias_values, device))
    if suppress:
        flat.index_fill_(
            0, _flat_keys([rows[i].suppress_token_ids for i in suppress], suppress, vocab, device), _NEG_INF
        )
    if repetition:
        seqs = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in repetition]
        keys = _flat_keys(seqs, repetition, vocab, device)  # repeated keys write equal values: no unique needed
        penalty = _per_row([r.params.repetition_penalty for r in rows], device)[keys // vocab]
        seen = flat[keys]
        flat[keys] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if frequency:
        outputs = [rows[i].output_token_ids for i in frequency]
        # unique on the host: its output's size depends on the data, which on a device means waiting for it
        keys, counts = torch.unique(_flat_keys(outputs, frequency, vocab, torch.device("cpu")), return_counts=True)
        keys, counts = to_device(keys, device), to_device(counts, device)
        frequency_penalty = _per_row([r.params.frequency_penalty for r in rows], device)[keys // vocab]
        presence_penalty = _per_row([r.params.presence_penalty for r in rows], device)[keys // vocab]
        flat[keys] = flat[keys] - (frequency_penalty * counts + presence_penalty)  # every key here has count > 0
    if masks:
        grammar = [i for i, _ in masks]
        allowed = to_device(torch.stack([mask for _, mask in masks]), device)
        x[grammar] = x[grammar].masked_fill(~allowed, _NEG_INF)
    return x


CANDIDATES = 256  # the most likely tokens a row's filters are first tried on, before a sort of the whole row


def filter_logits(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> torch.Tensor:
    """Per-row top_k (<= 0: off), then top_p, then min_p, as -inf in a new tensor; the most likely token always
    survives, so a row with any finite logit keeps at least one.

    One sort serves all three: of the `CANDIDATES` most likely tokens where every filtering row drops the next one
    (so all it keeps lie among them), else of the whole vocabulary. A sort of 32 rows of 49,152 tokens took 64 ms (231
    ms at 151,936), more than the decode step it served; the candidates take 3-5 ms. On a CPU only."""
    vocab, device = logits.shape[-1], logits.device
    ks = [v if 0 < v < vocab else vocab for v in top_k]
    k = to_device(torch.tensor(ks), device)
    # on a device, whether the candidates suffice would be a host sync before the tokens' own: a device sorts fast
    if device.type == "cpu" and vocab > CANDIDATES + 1 and all(n <= CANDIDATES or n == vocab for n in ks):
        values, order = logits.topk(CANDIDATES + 1, dim=-1)
        cut = torch.arange(CANDIDATES + 1)[None, :] >= k[:, None]
        # each row's probabilities are over its top_k tokens where it has a top_k, else over the whole vocabulary
        within = values.masked_fill(cut, _NEG_INF).logsumexp(dim=-1)
        log_total = torch.where(k < vocab, within, logits.logsumexp(dim=-1)) if vocab in ks else within
        remove = _filtered(values, cut, top_p, min_p, log_total)
        plain = torch.tensor([n == vocab and p >= 1.0 and m <= 0.0 for n, p, m in zip(ks, top_p, min_p, strict=True)])
        beyond = remove[:, CANDIDATES] | (values[:, CANDIDATES] == _NEG_INF)  # nothing past the candidates stays
        if bool((beyond | plain).all()):
            kept = values[:, :CANDIDATES].masked_fill(remove[:, :CANDIDATES], _NEG_INF)
            out = torch.full_like(logits, _NEG_INF).scatter_(-1, order[:, :CANDIDATES], kept)
            return torch.where(plain[:, None], logits, out) if bool(plain.any()) else out
    values, order = logits.sort(dim=-1, descending=True)
    cut = torch.arange(vocab, device=device)[None, :] >= k[:, None]
    remove = _filtered(values, cut, top_p, min_p, None)
    return torch.empty_like(logits).scatter_(-1, order, values.masked_fill_(remove, _NEG_INF))


def _filtered(
    values: torch.Tensor,
    cut: torch.Tensor,
    top_p: Sequence[float],
    min_p: Sequence[float],
    log_total: torch.Tensor | None,
) -> torch.Tensor:
    """Which of each row's tokens, sorted most likely first (`values`), its filters drop: those `cut` by top_k, then
    by top_p and min_p over the probabilities the top_k leaves (`log_total`: their log normalizer; None: `values`
    is the whole row)."""
    device = values.device
    # top_p == 1 means off; float rounding in the cumulative sum would otherwise clip the far tail.
    p = _column([v if v < 1.0 else math.inf for v in top_p], device)
    masked = values.masked_fill(cut, _NEG_INF)
    probs = masked.softmax(dim=-1) if log_total is None else (masked - log_total[:, None]).exp()
    remove = cut | ((probs.cumsum(dim=-1) - probs) > p)
    # min_p compares with the most likely token; the ratio does not change when top_k/top_p renormalize.
    return remove | (probs < _column(min_p, device) * probs[:, :1])


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)  # shared by unseeded rows
        self._seeded: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._seeded.pop(request_id, None)

    def _generator_for(self, row: SampleInput) -> torch.Generator:
        seed = row.params.seed
        if seed is None:
            return self._generator
        generator = self._seeded.get(row.request_id)
        if generator is None:
            generator = self._seeded[row.request_id] = torch.Generator().manual_seed(seed)
        return generator

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleInput]) -> SamplerOutput:
        raw = logits.float()
        tokens = self.choose(raw, rows)
        token_ids: list[int] = tokens.tolist()  # the one wait for the device
        return SamplerOutput(token_ids, sample_logprobs(raw, tokens, rows))

    def choose(self, raw: torch.Tensor, rows: Sequence[SampleInput]) -> torch.Tensor:
        """One token per row from float32 logits, left on their device: on CUDA only queued work, no host sync."""
        x = process_logits(raw, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        tokens = native.argmax(x)
        if x is raw and not sampled:
            return tokens
        chosen = x.gather(1, tokens[:, None])[:, 0]
        if sampled:
            index = to_device(torch.tensor(sampled), x.device)
            subset = x if len(sampled) == len(rows) else x.index_select(0, index)
            sub_tokens, sub_chosen = self._sample_rows(subset, [rows[i] for i in sampled])
            tokens.index_copy_(0, index, sub_tokens)
            chosen.index_copy_(0, index, sub_chosen)
        # A row with nothing left (every logit -inf) would yield a banned or NaN pick; the raw argmax is safer.
        dead = ~(chosen > _NEG_INF)
        # on a device, no host sync before the tokens' own: the fallback is applied whether needed or not
        if x.device.type != "cpu" or bool(dead.any()):
            tokens = torch.where(dead, native.argmax(raw), tokens)
        return tokens

    def _sample_rows(self, x: torch.Tensor, rows: Sequence[SampleInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its filtered logit per row, drawn from the softmax by one uniform number a row."""
        x = sampling_logits(x, rows)
        # One CPU draw per row from that row's generator keeps seeded rows independent of the batch.
        uniforms = torch.stack([self.uniform(r) for r in rows])
        tokens = inverse_cdf(x.softmax(dim=-1), to_device(uniforms, x.device))
        return tokens, x.gather(1, tokens[:, None])[:, 0]

    def uniform(self, row: SampleInput) -> torch.Tensor:
        """One float64 number in [0, 1) from the row's generator: its request's own where it has a seed."""
        return torch.rand((), dtype=torch.float64, generator=self._generator_for(row))


def sampling_logits(x: torch.Tensor, rows: Sequence[SampleInput]) -> torch.Tensor:
    """Processed logits divided by each row's temperature and filtered by its top_k, top_p and min_p: their softmax
    is the distribution a sampled row draws from."""
    params = [r.params for r in rows]
    x = x / _column([max(p.temperature, _MIN_TEMPERATURE) for p in params], x.device)
    vocab = x.shape[-1]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        x = filter_logits(x, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params])
    return x


CDF_BLOCK = 1024  # tokens summed together in the first level of `inverse_cdf`


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row of `probs` [rows, vocab] whose cumulative probability interval holds that row's uniform
    number in [0, 1): a draw from the row's distribution for one random number, where an exponential race
    (argmax p / q, q ~ Exp(1)) takes one a token. On 32 rows of SmolLM2's 49,152 tokens the race took 37 ms a step on
    a CPU, a third of the step's time; this takes about 1 ms.

    The cumulative sum runs in two levels: over the masses of blocks of `CDF_BLOCK` tokens, then over the tokens of
    the one block a row lands in, both accumulated in float64. One float32 running sum over the vocabulary would
    round each interval to the spacing of float32 numbers near the running total (6e-8 near 1), a large error for
    the many tokens less likely than that. A row's number is rescaled from its block's share of the first sum onto
    the block's own sum, so a block's float32 mass being off by its rounding (1e-7 of it) scales its tokens by as
    little, the float32 softmax's own precision. A token of probability 0 has an empty interval and is never drawn."""
    rows, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * CDF_BLOCK - vocab)).view(rows, blocks, CDF_BLOCK)
    mass = padded.sum(dim=-1).double()
    ends = mass.cumsum(dim=-1)
    total = ends[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(ends, target, right=True).clamp_max_(blocks - 1)
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp_min(0)), 0.0)
    inside = padded.gather(1, block[:, :, None].expand(rows, 1, CDF_BLOCK))[:, 0].cumsum(dim=-1, dtype=torch.float64)
    share = (target - start) / mass.gather(1, block)  # in [0, 1) but for rounding
    within = torch.minimum(share * inside[:, -1:], torch.nextafter(inside[:, -1:], torch.zeros_like(total)))
    index = torch.searchsorted(inside, within, right=True).clamp_max_(CDF_BLOCK - 1)
    return (block * CDF_BLOCK + index)[:, 0].clamp_max_(vocab - 1)  # a row of NaN (nothing left) lands anywhere


def sample_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SampleInput]
) -> list[SampleLogprobs | None]:
    """Logprobs of the raw distribution (OpenAI semantics): the chosen token plus the top-k, one topk call."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[SampleLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    index = to_device(torch.tensor(wanted), raw.device)
    ks = [rows[i].params.logprobs or 0 for i in wanted]
    for i, item in zip(wanted, token_logprobs(raw[index], tokens[index], ks), strict=True):
        out[i] = item
    return out

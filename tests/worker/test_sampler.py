"""The sampler's contract on CPU: greedy, filters, penalties, seeded reproducibility, logprobs, degenerate rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from worker import sampler as sampler_module
from worker.messages import SamplingParams
from worker.sampler import CDF_BLOCK, SampleInput, Sampler, filter_logits, inverse_cdf, process_logits

VOCAB = 64


def row(
    request_id: str = "r",
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    suppress: Sequence[int] = (),
    **params: Any,
) -> SampleInput:
    return SampleInput(request_id, SamplingParams(**params), list(prompt), list(output), list(suppress))


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(32).to(dtype)
    out = Sampler().sample(logits, [row(temperature=0.0) for _ in range(32)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 32


def test_top_k_one_and_tiny_top_p_are_greedy_at_high_temperature() -> None:
    sampler = Sampler(seed=3)
    for step in range(10):
        logits = random_logits(16, seed=step)
        rows = [row(temperature=50.0, top_k=1) for _ in range(8)] + [
            row(temperature=50.0, top_p=1e-6) for _ in range(8)
        ]
        assert sampler.sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_high_temperature_without_filters_is_not_greedy() -> None:
    # Guards the test above: the same setup without top_k/top_p must stray from the argmax.
    logits = random_logits(16)
    tokens = Sampler(seed=3).sample(logits, [row(temperature=50.0) for _ in range(16)]).token_ids
    assert tokens != logits.argmax(dim=-1).tolist()


def test_suppression_and_logit_bias_steer_the_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 4)
    rows = [
        row(temperature=0.0, suppress=[0]),
        row(temperature=0.0, suppress=[0, 1, 99]),  # 99 is outside the vocabulary: ignored
        row(temperature=0.0, logit_bias={3: 10.0, 1000: 50.0}),
        row(temperature=1.0, suppress=[0, 1, 2], logit_bias={2: 100.0}),  # suppression wins over bias
    ]
    assert Sampler().sample(logits, rows).token_ids == [1, 2, 3, 3]


def test_logit_bias_is_added() -> None:
    logits = torch.ones(2, 4)
    out = process_logits(logits, [row(logit_bias={1: 2.5, 3: -1.0}), row()])
    assert out.tolist() == [[1.0, 3.5, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert logits.eq(1).all()  # the input is never modified


def test_repetition_penalty_is_hf_style_over_prompt_and_output() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 3.0]])
    out = process_logits(logits, [row(prompt=[0, 1, 0], output=[2], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, -1.0, 3.0]]
    # Token 4 was never seen, so the greedy pick moves from 2 to 4.
    assert Sampler().sample(logits, [row(prompt=[2], temperature=0.0, repetition_penalty=2.0)]).token_ids == [4]


def test_frequency_and_presence_penalties_are_openai_style_over_output_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    rows = [row(prompt=[3, 3, 3], output=[0, 0, 0, 1], frequency_penalty=0.5, presence_penalty=0.25)]
    assert process_logits(logits, rows).tolist() == [[1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]]
    negative = [row(output=[2, 2], frequency_penalty=-1.0, temperature=0.0)]
    assert Sampler().sample(logits, negative).token_ids == [2]


def _reference(logits: torch.Tensor, rows: Sequence[SampleInput]) -> torch.Tensor:
    """The stages written plainly, one row and one token at a time."""
    out = logits.clone()
    vocab = out.shape[-1]
    for x, r in zip(out, rows, strict=True):
        for token, bias in r.params.logit_bias.items():
            if token < vocab:
                x[token] += bias
        for token in r.suppress_token_ids:
            if token < vocab:
                x[token] = -math.inf
        penalty = r.params.repetition_penalty
        for token in {t for t in [*r.prompt_token_ids, *r.output_token_ids] if t < vocab}:
            x[token] = x[token] / penalty if x[token] > 0 else x[token] * penalty
        for token in {t for t in r.output_token_ids if t < vocab}:
            count = r.output_token_ids.count(token)
            x[token] -= r.params.frequency_penalty * count + r.params.presence_penalty
    return out


def test_stages_match_a_plain_reference() -> None:
    gen = torch.Generator().manual_seed(9)

    def ids(n: int, high: int = VOCAB + 8) -> list[int]:  # some ids fall outside the vocabulary
        return torch.randint(0, high, (n,), generator=gen).tolist()

    logits = random_logits(24)
    rows = []
    for i in range(24):
        params: dict[str, Any] = {}
        if i % 2:
            params["repetition_penalty"] = 1.0 + i / 10
        if i % 3 == 0:
            params["frequency_penalty"] = 0.4
        if i % 4 == 0:
            params["presence_penalty"] = -0.7
        if i % 5 == 0:
            params["logit_bias"] = dict.fromkeys(ids(4), float(i))
        suppress = ids(3) if i % 7 == 0 else []
        rows.append(row(prompt=ids(12), output=ids(30, high=VOCAB // 4), suppress=suppress, **params))
    torch.testing.assert_close(process_logits(logits, rows), _reference(logits, rows), rtol=0, atol=1e-5)


def test_stages_apply_only_to_their_rows() -> None:
    logits = random_logits(3)
    rows = [row(), row(output=[1, 2], prompt=[3], frequency_penalty=1.0, repetition_penalty=1.5), row()]
    out = process_logits(logits, rows)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])
    plain = torch.ones(2, 4)
    assert process_logits(plain, [row(), row()]) is plain  # nothing to do: no copy


def test_top_p_and_min_p_filters() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None, :].repeat(3, 1)
    out = filter_logits(logits, top_k=[0, 0, 3], top_p=[0.7, 1.0, 1.0], min_p=[0.0, 0.2, 0.0])
    kept = torch.isfinite(out).tolist()
    assert kept == [[True, True, False, False], [True, True, True, False], [True, True, True, False]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def _filter_cases(vocab: int) -> tuple[torch.Tensor, list[int], list[float], list[float]]:
    """Rows of every kind: peaked (its top_p mass within the candidates) and flat, top_k, min_p, a row with no filter,
    a row with nothing left and one with ten finite logits."""
    logits = random_logits(8, vocab, seed=5)
    logits[0] *= 4  # peaked: top_p 0.9 is reached within a few dozen tokens
    logits[1] *= 0.05  # nearly flat: top_p 0.9 needs most of the vocabulary
    logits[6] = -math.inf
    logits[7, 10:] = -math.inf
    top_k = [0, 0, 5, 0, 0, 0, 0, 0]
    top_p = [0.9, 0.9, 1.0, 0.5, 1.0, 1.0, 0.9, 0.9]
    min_p = [0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0]
    return logits, top_k, top_p, min_p


@pytest.mark.parametrize("rows", [[0, 2, 3, 4, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_filters_over_the_candidates_equal_a_sort_of_the_whole_row(
    rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every filtering row keeps only tokens among the candidates (the first set), they alone are sorted; where
    one does not (the flat row, the dead row), the whole rows are. Either way the result is the full sort's."""
    vocab = 4 * CDF_BLOCK
    all_logits, all_k, all_p, all_min_p = _filter_cases(vocab)
    logits = all_logits[rows]
    top_k, top_p, min_p = [all_k[i] for i in rows], [all_p[i] for i in rows], [all_min_p[i] for i in rows]
    sorted_widths: list[int] = []
    real = sampler_module._filtered

    def spy(values: torch.Tensor, *args: Any) -> torch.Tensor:
        sorted_widths.append(values.shape[-1])
        return real(values, *args)

    monkeypatch.setattr(sampler_module, "_filtered", spy)
    got = filter_logits(logits, top_k, top_p, min_p)
    fast = sorted_widths == [sampler_module.CANDIDATES + 1]
    assert fast == (rows == [0, 2, 3, 4, 5, 7]), sorted_widths
    monkeypatch.setattr(sampler_module, "CANDIDATES", vocab)  # no candidates: the whole rows are sorted
    want = filter_logits(logits, top_k, top_p, min_p)
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[~got.isinf()], want[~want.isinf()])
    assert 0 < int((~got[0].isinf()).sum()) < sampler_module.CANDIDATES  # the peaked row's top_p did cut


def test_min_p_sampling_never_picks_filtered_tokens() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]).log()[None, :].repeat(2000, 1)
    tokens = Sampler(seed=1).sample(logits, [row(min_p=0.2) for _ in range(2000)]).token_ids
    assert set(tokens) == {0, 1, 2}


def test_sampling_frequencies_match_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    for temperature in (1.0, 2.0):
        tokens = Sampler(seed=7).sample(logits, [row(temperature=temperature)] * 20000).token_ids
        counts = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
        expected = (logits[0] / temperature).softmax(dim=-1)
        assert torch.allclose(counts, expected, atol=0.015), (temperature, counts, expected)


def test_draws_across_blocks_follow_the_softmax_by_a_chi_square_test() -> None:
    """60,000 draws over a vocabulary of three `CDF_BLOCK` blocks, one of them all -inf and every 7th token -inf, at
    the 0.1% level (Pearson's chi-square over bins of at least 5 expected draws)."""
    vocab, draws, batch = 3 * CDF_BLOCK - 100, 60_000, 2_000
    logits = random_logits(1, vocab, seed=3)[0] / 2
    logits[CDF_BLOCK : 2 * CDF_BLOCK] = -math.inf
    logits[::7] = -math.inf
    sampler = Sampler(seed=11)
    tokens = torch.cat(
        [
            torch.tensor(sampler.sample(logits.repeat(batch, 1), [row(temperature=1.0)] * batch).token_ids)
            for _ in range(draws // batch)
        ]
    )
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = logits.double().softmax(dim=-1) * draws
    assert counts[expected == 0].sum() == 0  # a token of probability 0 is never drawn
    order = expected.argsort()  # bins: the least likely tokens together until each bin expects 5 draws
    observed, want, acc_o, acc_e = [], [], 0.0, 0.0
    for token in order[expected[order] > 0].tolist():
        acc_o, acc_e = acc_o + counts[token].item(), acc_e + expected[token].item()
        if acc_e >= 5:
            observed.append(acc_o)
            want.append(acc_e)
            acc_o = acc_e = 0.0
    bins = torch.tensor(observed), torch.tensor(want)
    statistic = ((bins[0] - bins[1]) ** 2 / bins[1]).sum()
    p_value = torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2), statistic / 2).item()
    assert p_value > 1e-3, (statistic.item(), len(observed), p_value)


def test_a_token_far_less_likely_than_float32_spacing_keeps_its_interval() -> None:
    """A token of probability 1e-9 after one of 0.6 in the same block: one float32 running sum would give it an
    interval of 0 or 6e-8; here the uniforms that draw it span its probability to within 1%."""
    probs = torch.zeros(1, 2 * CDF_BLOCK)
    probs[0, CDF_BLOCK + 10] = 0.6
    probs[0, CDF_BLOCK + 11] = 1e-9
    probs[0, CDF_BLOCK + 12] = 0.4 - 1e-9
    probs[0, 5] = 0.0
    start = probs[0, : CDF_BLOCK + 11].double().sum().item() / probs.double().sum().item()
    width = probs[0, CDF_BLOCK + 11].double().item() / probs.double().sum().item()

    def drawn(u: float) -> int:
        return int(inverse_cdf(probs, torch.tensor([u], dtype=torch.float64)).item())

    assert drawn(start - 0.01 * width) == CDF_BLOCK + 10
    assert drawn(start + 0.01 * width) == CDF_BLOCK + 11
    assert drawn(start + 0.99 * width) == CDF_BLOCK + 11
    assert drawn(start + 1.01 * width) == CDF_BLOCK + 12
    assert drawn(0.0) == CDF_BLOCK + 10 and drawn(1.0 - 2**-53) == CDF_BLOCK + 12


def _run_seeded(batch_of: int, position: int, seed: int, steps: int = 20) -> list[int]:
    """Tokens of request "target" (seed `seed`) over `steps`, sampled at `position` inside a batch of `batch_of`."""
    sampler = Sampler(seed=123 + batch_of)
    output: list[int] = []
    others: list[list[int]] = [[] for _ in range(batch_of)]
    for step in range(steps):
        target = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 + step)) * 2
        logits = random_logits(batch_of + 1, seed=step + batch_of)
        logits[position] = target
        rows = []
        for i in range(batch_of):
            seeded: dict[str, Any] = {"seed": 50 + i} if i % 3 == 0 else {}
            rows.append(row(f"other-{i}", output=others[i], temperature=0.8, top_p=0.9, **seeded))
        params: dict[str, Any] = {
            "temperature": 0.9,
            "top_k": 20,
            "top_p": 0.95,
            "frequency_penalty": 0.3,
            "seed": seed,
        }
        rows.insert(position, row("target", prompt=[1, 2, 3], output=list(output), **params))
        tokens = sampler.sample(logits, rows).token_ids
        output.append(tokens[position])
        for i, token in enumerate(tokens[:position] + tokens[position + 1 :]):
            others[i].append(token)
    return output


def test_seeded_row_ignores_its_batch() -> None:
    alone = _run_seeded(batch_of=0, position=0, seed=42)
    assert _run_seeded(batch_of=16, position=5, seed=42) == alone
    assert _run_seeded(batch_of=16, position=16, seed=42) == alone
    assert _run_seeded(batch_of=0, position=0, seed=43) != alone


def test_release_restarts_a_seeded_request() -> None:
    sampler = Sampler()
    logits = torch.zeros(1, 1000)
    first = sampler.sample(logits, [row("a", seed=5)]).token_ids
    second = sampler.sample(logits, [row("a", seed=5)]).token_ids
    sampler.release("a")
    assert sampler.sample(logits, [row("a", seed=5)]).token_ids == first
    assert first != second  # the generator advances while the request lives


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(3)
    rows = [
        row(temperature=0.0, logprobs=5, logit_bias={0: 100.0}),
        row(temperature=1.0, logprobs=0),
        row(temperature=0.0),
    ]
    out = Sampler().sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[0] == 0
    first, second, third = out.logprobs
    assert first is not None and second is not None and third is None
    assert first.chosen.token_id == 0 and first.chosen.logprob == pytest.approx(expected[0, 0].item(), abs=1e-6)
    values, ids = expected[0].topk(5)
    assert [t.token_id for t in first.top] == ids.tolist()
    assert [t.logprob for t in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert second.top == [] and second.chosen.token_id == out.token_ids[1]
    assert second.chosen.logprob == pytest.approx(expected[1, out.token_ids[1]].item(), abs=1e-6)


def test_rows_with_nothing_left_fall_back_to_raw_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [-math.inf] * 3, [-math.inf] * 3, [0.0, 1.0, 2.0]])
    rows = [
        row(temperature=0.0, suppress=[0, 1, 2]),
        row(temperature=1.0, suppress=[0, 1, 2]),
        row(temperature=0.0),
        row(temperature=0.7, top_p=0.5, top_k=2),
        row(temperature=1.0, top_k=1),
    ]
    tokens = Sampler().sample(logits, rows).token_ids
    assert tokens[:2] == [1, 1] and tokens[4] == 2
    assert all(0 <= t < 3 for t in tokens[2:4])


def test_tiny_temperature_acts_like_greedy() -> None:
    logits = random_logits(8)
    tokens = Sampler().sample(logits, [row(temperature=1e-38) for _ in range(8)]).token_ids
    assert tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_nothing_before_the_tokens_waits_for_the_device() -> None:
    """Every stage up to the tokens' own copy to the host queues work without a sync (CUDA's sync debug mode raises
    at any), then the tokens match the same rows sampled on the CPU."""
    logits = random_logits(6, vocab=1000)
    rows = [
        row("a", prompt=[1, 2, 3], output=[4, 4], repetition_penalty=1.3, frequency_penalty=0.5, seed=1),
        row("b", output=[5], presence_penalty=0.7, logit_bias={7: 5.0}, top_k=20, seed=2),
        row("c", suppress=[9, 10], top_p=0.8, min_p=0.05, temperature=0.7, seed=3),
        row("d", temperature=0.0),
        row("e", top_k=1, seed=4),
        row("f", temperature=1.5, seed=5),
    ]
    cuda = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = Sampler().choose(cuda, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.tolist() == Sampler().choose(logits, rows).tolist()

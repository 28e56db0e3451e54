"""The acceptance rule on known distributions: greedy keeps exactly the argmax run; sampling emits each position's
token from that position's filtered distribution, whatever was proposed."""

from __future__ import annotations

import torch

from worker.messages import SamplingParams
from worker.sampler import SampleInput, Sampler
from worker.spec_decode.verify import verify

SIGNIFICANCE = 1e-3
LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.5, 0.0, -1.0, -9.0],
        [0.0, 1.5, 1.4, -0.5, 0.2, -9.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ]
)


def rows(params: SamplingParams, count: int, request_id: str = "r") -> list[SampleInput]:
    return [SampleInput(request_id, params, [1], [], []) for _ in range(count)]


def goodness_p(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of a chi-square test that counts `observed` follow `probs` (categories of probability 0 must be
    empty, and are left out)."""
    assert bool((observed[probs == 0] == 0).all()), f"drew a token of probability 0: {observed.tolist()}"
    keep = probs > 0
    expected = probs[keep].double() * observed.sum()
    statistic = ((observed[keep].double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64), statistic / 2))


def test_greedy_keeps_the_run_of_argmax_tokens_then_adds_the_models_own() -> None:
    greedy = SamplingParams(temperature=0.0)
    sampler = Sampler()
    got = verify(sampler, LOGITS, rows(greedy, 3), [[0, 1]])
    assert got[0].token_ids == [0, 1, 0]  # both kept; the last row's ties go to the first token
    got = verify(sampler, LOGITS, rows(greedy, 3), [[0, 2]])
    assert got[0].token_ids == [0, 1]  # the second is not row 1's argmax: row 1's own choice ends it
    got = verify(sampler, LOGITS[:2], rows(greedy, 1) + rows(greedy, 1, "s"), [[], []])
    assert [v.token_ids for v in got] == [[0], [1]]


def test_logprobs_come_for_every_emitted_token() -> None:
    params = SamplingParams(temperature=0.0, logprobs=2)
    got = verify(Sampler(), LOGITS, rows(params, 3), [[0, 2]])[0]
    assert got.logprobs is not None and len(got.logprobs) == 2
    expected = LOGITS[:2].log_softmax(dim=-1)
    assert [lp.chosen.token_id for lp in got.logprobs] == [0, 1]
    assert [lp.chosen.logprob for lp in got.logprobs] == torch.stack([expected[0, 0], expected[1, 1]]).tolist()
    assert [t.token_id for t in got.logprobs[1].top] == [1, 2]


def test_sampled_positions_follow_their_distributions_whatever_is_proposed() -> None:
    params = SamplingParams(temperature=0.7, top_k=4)
    probs = (LOGITS / 0.7).softmax(dim=-1)
    probs[0, 4:] = 0.0  # top_k 4 (row 2 is uniform: its top 4 are its first 4, the sort's tie order)
    probs[1, [3, 5]] = 0.0
    probs[2, 4:] = 0.0
    probs = probs / probs.sum(dim=-1, keepdim=True)
    groups = 12_000
    for proposed in ([0, 1], [1, 3], [4, 4]):  # likely, unlikely, and outside top_k
        got = verify(
            Sampler(seed=7),
            LOGITS.repeat(groups, 1),
            rows(params, 3 * groups),
            [proposed] * groups,
        )
        first = torch.bincount(torch.tensor([v.token_ids[0] for v in got]), minlength=6)
        assert goodness_p(first, probs[0]) > SIGNIFICANCE, (proposed, first.tolist())
        after = [v.token_ids[1] for v in got if v.token_ids[0] == proposed[0] and len(v.token_ids) > 1]
        if proposed[0] == 0:
            second = torch.bincount(torch.tensor(after), minlength=6)
            assert goodness_p(second, probs[1]) > SIGNIFICANCE, (proposed, second.tolist())
        kept = sum(v.token_ids[0] == proposed[0] for v in got if len(v.token_ids) > 1)
        assert abs(kept / groups - float(probs[0, proposed[0]])) < 0.02  # kept as often as it is likely

"""Speculation leaves outputs unchanged: greedy tokens equal transformers' `generate` and the engine's own without
speculation, under concurrency, chunked prefill, prefix hits and preemption; sampled tokens keep their distribution.

A tiny random model rarely repeats its prompt, so most of these tests propose from a script (`Scripted`): the
tokens the model will produce, with every third proposal broken at its second token. That drives every path of the
verification (all kept, some kept, none kept) in every test; the real n-gram proposer runs in the last tests here and
against SmolLM2 in `test_smollm2_spec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import drain, make_engine, random_prompts, reference, run_all
from worker.engine import Engine
from worker.messages import SamplingParams, StepOutput
from worker.registry import SpeculativeSpec
from worker.sequence import Sequence
from worker.spec_decode.speculator import Speculator

LENGTHS = [1, 3, 7, 12, 16, 23, 31, 45]
GREEDY = SamplingParams(max_tokens=14, temperature=0.0)
NGRAM = SpeculativeSpec(method="ngram", num_tokens=4)
SIGNIFICANCE = 1e-3  # of each chi-square test below: a correct sampler fails one of them this rarely


class Scripted(Speculator):
    """Proposes the tokens a request is expected to produce (`script`), breaking every third proposal."""

    def __init__(self, script: dict[str, list[int]], vocab: int, num_tokens: int = 4) -> None:
        super().__init__(SpeculativeSpec(method="ngram", num_tokens=num_tokens))
        self.script = script
        self.vocab = vocab
        self.calls = 0

    def propose(self, seqs: Iterable[Sequence], max_model_len: int, break_even: float) -> None:
        for seq in seqs:
            self.calls += 1
            done = seq.num_output_tokens
            room = min(seq.params.max_tokens - done, max_model_len - seq.num_tokens) - 1
            drafts = self.script.get(seq.request_id, [])[done : done + min(self.num_tokens, room)]
            if self.calls % 3 == 0 and len(drafts) > 1:
                drafts[1] = (drafts[1] + 1) % self.vocab
            seq.draft_token_ids = drafts


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def vocab(model: PreTrainedModel) -> int:
    return int(model.config.vocab_size)


def scripted(model: PreTrainedModel, script: dict[str, list[int]], num_tokens: int = 4, **kwargs: int) -> Engine:
    engine = make_engine(model, **kwargs)
    engine.speculator = Scripted(script, vocab(model), num_tokens)
    return engine


def references(model: PreTrainedModel, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
    return {rid: reference(model, prompt, max_tokens) for rid, prompt in prompts.items()}


def assert_verified_some_of_each(engine: Engine, steps: Seq[StepOutput]) -> None:
    stats = steps[-1].stats
    assert stats.spec_num_drafts > 0
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.spec_accepted_per_position[-1] > 0, "some proposals should be kept whole"
    assert any(len(item.new_token_ids) > 1 for step in steps for item in step.outputs)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    "scenario", ["concurrent", "chunked", "preempted", "one_token_budget"], ids=lambda scenario: scenario
)
def test_greedy_with_proposals_equals_generate(model: PreTrainedModel, scenario: str) -> None:
    prompts = random_prompts(vocab(model), LENGTHS, seed=21)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    expected = references(model, prompts, params.max_tokens)
    kwargs: dict[str, int] = {
        "concurrent": {},
        "chunked": {"max_num_batched_tokens": 10},  # prompts in chunks beside decodes, proposals cut to what is left
        "preempted": {"num_blocks": 22, "block_size": 4},  # 88 slots for 8 requests of up to 65 tokens
        "one_token_budget": {"max_num_batched_tokens": 16, "max_num_seqs": 16},
    }[scenario]
    engine = scripted(model, expected, **kwargs)
    run = run_all(engine, prompts, params)
    assert run.tokens == expected
    assert_verified_some_of_each(engine, run.steps)
    if scenario == "preempted":
        assert run.steps[-1].stats.num_preemptions > 0


def test_prefix_hits_with_proposals_equal_generate(model: PreTrainedModel) -> None:
    shared = random_prompts(vocab(model), [21], seed=7)["r0"]
    first = random_prompts(vocab(model), [5], seed=2, prefix=shared)
    rest = random_prompts(vocab(model), [1, 4, 9, 13], seed=3, prefix=shared)
    expected = references(model, first | {f"b{k}": v for k, v in rest.items()}, GREEDY.max_tokens)
    engine = scripted(model, expected)
    run = run_all(engine, first, GREEDY)
    run2 = run_all(engine, {f"b{k}": v for k, v in rest.items()}, GREEDY)
    assert run.tokens | run2.tokens == expected
    assert run2.steps[-1].stats.prefix_cache_hits >= 4 * 20
    assert_verified_some_of_each(engine, run.steps + run2.steps)
    # the cache never registered a block past what was verified: a repeat of each output hits all its full blocks
    engine.speculator = None
    again = run_all(engine, {k: v + expected[k] for k, v in first.items()}, SamplingParams(max_tokens=1))
    assert again.steps[-1].stats.prefix_cache_hits >= run2.steps[-1].stats.prefix_cache_hits + 32


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=18, temperature=0.0, repetition_penalty=1.5, logprobs=3),
        SamplingParams(max_tokens=18, temperature=0.0, frequency_penalty=0.8, presence_penalty=0.4, min_tokens=12),
        SamplingParams(max_tokens=18, temperature=0.0, logit_bias={5: 3.0, 9: -50.0}, stop_token_ids=[17, 41]),
    ],
    ids=["repetition-logprobs", "frequency-min_tokens", "bias-stop"],
)
def test_sampling_knobs_hold_with_proposals(model: PreTrainedModel, params: SamplingParams) -> None:
    """Penalties, min_tokens and stops count the kept proposals before each position; logprobs come per token."""
    prompts = random_prompts(vocab(model), [4, 9, 15, 22], seed=5)
    plain = run_all(make_engine(model), prompts, params)
    engine = scripted(model, plain.tokens)
    run = run_all(engine, prompts, params)
    assert run.tokens == plain.tokens
    assert run.finish == plain.finish
    assert engine.speculator is not None and engine.speculator.counts.num_accepted_tokens > 0
    if params.logprobs:
        for rid in prompts:
            got = [lp for step in run.steps for o in step.outputs if o.request_id == rid for lp in o.logprobs or []]
            want = [lp for step in plain.steps for o in step.outputs if o.request_id == rid for lp in o.logprobs or []]
            assert len(got) == len(want) == len(run.tokens[rid])
            for a, b in zip(got, want, strict=True):
                assert a.chosen.token_id == b.chosen.token_id
                assert a.chosen.logprob == pytest.approx(b.chosen.logprob, abs=1e-4)
                assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


def chi_square_p(counts: torch.Tensor) -> float:
    """The p-value of a chi-square test that the rows of `counts` [2, categories] come from one distribution."""
    counts = counts[:, counts.sum(dim=0) > 0].double()
    expected = counts.sum(dim=1, keepdim=True) * counts.sum(dim=0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


class Likeliest(Speculator):
    """Proposes, after each output so far, the token that most often followed it in other draws (`table`): likely,
    but not always right, proposals, so both the keep and the redraw branches of each row are taken often."""

    def __init__(self, table: dict[tuple[int, ...], int], num_tokens: int) -> None:
        super().__init__(SpeculativeSpec(method="ngram", num_tokens=num_tokens))
        self.table = table

    def propose(self, seqs: Iterable[Sequence], max_model_len: int, break_even: float) -> None:
        for seq in seqs:
            context = tuple(seq.output_token_ids)
            room = seq.params.max_tokens - len(context) - 1
            drafts: list[int] = []
            while len(drafts) < min(self.num_tokens, room) and (token := self.table.get(context)) is not None:
                drafts.append(token)
                context = (*context, token)
            seq.draft_token_ids = drafts


def test_sampled_tokens_keep_their_distribution(model: PreTrainedModel) -> None:
    """Many seeded draws of a request's first four tokens with and without proposals come from the same
    distribution at each position (`test_verify` holds the rule itself to known distributions)."""
    if model.config.model_type != "llama":
        pytest.skip("one architecture is enough: the rule does not depend on the model")
    prompt = random_prompts(vocab(model), [6], seed=9)["r0"]

    def draws(engine: Engine, seeds: range) -> torch.Tensor:
        for seed in seeds:
            engine.add_request(f"s{seed}", prompt, SamplingParams(max_tokens=4, temperature=0.8, top_k=4, seed=seed))
        run = drain(engine)
        return torch.tensor([run.tokens[f"s{seed}"] for seed in seeds])

    seeds = range(3000)
    plain = draws(make_engine(model, max_num_seqs=128), seeds)
    others = draws(make_engine(model, max_num_seqs=128), range(10_000, 11_000))  # the proposals' own draws
    followers: dict[tuple[int, ...], list[int]] = {}
    for row in others.tolist():
        for position in range(1, 4):
            followers.setdefault(tuple(row[:position]), []).append(row[position])
    table = {context: max(set(tokens), key=tokens.count) for context, tokens in followers.items()}
    engine = make_engine(model, max_num_seqs=128)
    engine.speculator = Likeliest(table, num_tokens=2)
    spec = draws(engine, seeds)
    counts = engine.speculator.counts
    assert 0.2 < counts.num_accepted_tokens / counts.num_draft_tokens < 0.8
    for position in range(4):
        both = torch.stack([torch.bincount(x[:, position], minlength=vocab(model)) for x in (plain, spec)])
        assert chi_square_p(both) > SIGNIFICANCE, f"position {position}: {both[:, both.sum(0) > 0].tolist()}"
    # a seeded request repeats itself with proposals too
    engine = make_engine(model, max_num_seqs=128)
    engine.speculator = Likeliest(table, num_tokens=2)
    assert torch.equal(draws(engine, seeds), spec)


def test_ngram_proposals_equal_generate_on_a_looping_model(model: PreTrainedModel) -> None:
    """The real proposer on prompts that repeat: whatever it proposes, the output is generate's."""
    base = random_prompts(vocab(model), [3, 5, 8, 13], seed=3)
    prompts = {rid: (tokens * 8)[:40] for rid, tokens in base.items()}
    params = SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=0.7)  # <1 favours repeats
    plain = run_all(make_engine(model), prompts, params)
    engine = make_engine(model, speculative=NGRAM)
    run = run_all(engine, prompts, params)
    assert run.tokens == plain.tokens
    assert engine.speculator is not None and engine.speculator.counts.num_accepted_tokens > 0
    assert engine.block_manager.num_used_blocks == 0

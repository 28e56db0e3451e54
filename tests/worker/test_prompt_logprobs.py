"""Prompt logprobs against the model's own float32 forward: every prompt position's logprob, rank and top-k, however
the prompt is chunked, preempted or shares a cached prefix; and max_tokens 0, which scores a prompt and stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import drain, make_engine, random_prompts, run_all
from worker.engine import Engine
from worker.messages import InvalidRequest, RequestOutput, SampleLogprobs, SamplingParams

K = 4
SCORE = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=K)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def vocab(model: PreTrainedModel) -> int:
    return int(model.config.vocab_size)


def first_outputs(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, RequestOutput]:
    run = run_all(engine, prompts, params)
    firsts: dict[str, RequestOutput] = {}
    for step in run.steps:
        for out in step.outputs:
            firsts.setdefault(out.request_id, out)
            assert out is firsts[out.request_id] or out.prompt_logprobs is None, "sent with the first output only"
    return firsts


def assert_matches_forward(model: PreTrainedModel, prompt: list[int], got: list[SampleLogprobs | None] | None) -> None:
    """`got` equals log_softmax of `model(prompt).logits` at each position before a prompt token: the token's logprob,
    its rank (tokens at least as likely, itself included) and the K most likely, in order."""
    with torch.inference_mode():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for position, item in enumerate(got[1:]):
        assert item is not None
        row, token = logprobs[position], prompt[position + 1]
        assert item.chosen.token_id == token
        assert item.chosen.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert item.rank == int((row >= row[token]).sum())
        top = row.topk(K)
        assert [alt.token_id for alt in item.top] == top.indices.tolist()
        assert [alt.logprob for alt in item.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_chunked_prompts_are_scored_at_every_position(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), [1, 2, 9, 45, 70], seed=21)
    engine = make_engine(model, max_num_batched_tokens=8)
    outputs = first_outputs(engine, prompts, SCORE)
    for rid, prompt in prompts.items():
        out = outputs[rid]
        assert out.finish_reason == "length" and out.new_token_ids == [] and out.num_prompt_tokens == len(prompt)
        assert_matches_forward(model, prompt, out.prompt_logprobs)
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_a_cached_prefix_is_scored_again_and_shared_after(model: PreTrainedModel) -> None:
    shared = random_prompts(vocab(model), [22], seed=5)["r0"]
    engine = make_engine(model, max_num_batched_tokens=16)
    run_all(engine, {"warm": [*shared, 3]}, SamplingParams(max_tokens=2, temperature=0.0))
    prompts = random_prompts(vocab(model), [6, 11], seed=6, prefix=shared)
    outputs = first_outputs(engine, prompts, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=K))
    for rid, prompt in prompts.items():
        assert outputs[rid].num_cached_tokens == 0, "a scored prompt takes no cached blocks"
        assert_matches_forward(model, prompt, outputs[rid].prompt_logprobs)
    # what a scored prompt computed is published for others
    after = first_outputs(engine, {"after": prompts["r1"]}, SamplingParams(max_tokens=1, temperature=0.0))
    assert after["after"].num_cached_tokens >= 24


def test_preempted_prompts_are_scored_once(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), [12, 31, 45, 23, 40], seed=8)
    params = SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=K)
    engine = make_engine(model, num_blocks=18, block_size=4, max_num_batched_tokens=16)
    outputs = first_outputs(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    for rid, prompt in prompts.items():
        assert_matches_forward(model, prompt, outputs[rid].prompt_logprobs)


def test_greedy_tokens_do_not_change(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), [5, 17, 33], seed=9)
    plain = SamplingParams(max_tokens=10, temperature=0.0)
    scored = SamplingParams(max_tokens=10, temperature=0.0, prompt_logprobs=2, logprobs=2)
    without = run_all(make_engine(model, max_num_batched_tokens=8), prompts, plain)
    engine = make_engine(model, max_num_batched_tokens=8)
    engine.runner.capture_decode_graphs(max_num_seqs=4, max_model_len=engine.max_model_len, capture=False)
    with_scores = run_all(engine, prompts, scored)
    assert with_scores.tokens == without.tokens
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0  # decodes still replay
    assert all(len(tokens) == 10 for tokens in without.tokens.values())


def test_max_tokens_zero_without_logprobs_just_prefills(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=0))
    run = drain(engine)
    assert run.tokens == {"a": []} and run.finish == {"a": "length"}
    (out,) = [o for step in run.steps for o in step.outputs]
    assert out.prompt_logprobs is None and out.num_prompt_tokens == 5


def test_prompt_logprobs_range_is_checked() -> None:
    for bad in (-1, 21):
        with pytest.raises(InvalidRequest) as err:
            SamplingParams(prompt_logprobs=bad)
        assert err.value.param == "prompt_logprobs"


def test_a_step_that_fails_after_scoring_scores_again_once(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while sampling: the largest request fails, the other runs its step again, and each of its prompt
    tokens still has one logprob, the forward's."""
    prompts = {"scored": random_prompts(vocab(model), [13], seed=3)["r0"], "big": list(range(5, 45))}
    engine = make_engine(model)
    sample = engine.sampler.sample
    failures = iter([True])

    def failing_once(logits: torch.Tensor, rows: list[object]) -> object:
        if next(failures, False):
            raise torch.OutOfMemoryError("test")
        return sample(logits, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.sampler, "sample", failing_once)
    engine.add_request("scored", prompts["scored"], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K))
    engine.add_request("big", prompts["big"], SamplingParams(max_tokens=2, temperature=0.0))
    run = drain(engine)
    assert run.finish == {"scored": "length", "big": "error"}
    (first,) = [o for step in run.steps for o in step.outputs if o.request_id == "scored" and o.new_token_ids][:1]
    assert_matches_forward(model, prompts["scored"], first.prompt_logprobs)

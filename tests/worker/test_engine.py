"""The engine against transformers' own `generate`: greedy outputs must be equal, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

from tests.worker.engine_harness import drain, make_engine, random_prompts, reference, run_all
from worker.messages import InvalidRequest, SamplingParams
from worker.model_runner import SHORT_PREFILL

LENGTHS = [1, 3, 7, 12, 16, 23, 31, 45]
GREEDY = SamplingParams(max_tokens=14, temperature=0.0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    if request.param == "mistral":
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=400,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            sliding_window=None,
            initializer_range=0.2,
            eos_token_id=2,
        )
        return MistralForCausalLM(config).eval()
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def vocab(model: PreTrainedModel) -> int:
    return int(model.config.vocab_size)


def references(model: PreTrainedModel, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
    return {rid: reference(model, prompt, max_tokens) for rid, prompt in prompts.items()}


def test_concurrent_greedy_equals_generate(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), LENGTHS)
    run = run_all(make_engine(model), prompts, GREEDY)
    assert run.tokens == references(model, prompts, GREEDY.max_tokens)
    assert max(len(step.outputs) for step in run.steps) == len(prompts), "all requests should share steps"


@pytest.mark.parametrize("native_rows", [True, False])
def test_long_prompts_equal_generate_with_either_prefill_attention(model: PreTrainedModel, native_rows: bool) -> None:
    """Spans longer than SHORT_PREFILL attend with SDPA (a chunk after the first one with a mask over the cached
    context); shorter ones row by row through the decode kernel, or all with SDPA where that kernel is off."""
    prompts = random_prompts(vocab(model), [SHORT_PREFILL + 6, 2 * SHORT_PREFILL + 9, 40], seed=11)
    engine = make_engine(model, max_num_batched_tokens=SHORT_PREFILL + 32)
    engine.runner.native_decode = engine.runner.native_decode and native_rows
    run = run_all(engine, prompts, GREEDY)
    assert run.tokens == references(model, prompts, GREEDY.max_tokens)


def test_chunked_prefill_equals_generate(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), LENGTHS, seed=1)
    engine = make_engine(model, max_num_batched_tokens=8)
    run = run_all(engine, prompts, GREEDY)
    assert run.tokens == references(model, prompts, GREEDY.max_tokens)
    assert all(step.stats.step_tokens <= 8 for step in run.steps)
    # the 45-token prompt needs at least 6 steps before its first token
    assert len(run.steps) >= 45 // 8 + GREEDY.max_tokens


def test_prefix_cache_hits_equal_generate(model: PreTrainedModel) -> None:
    shared = random_prompts(vocab(model), [21], seed=7)["r0"]
    first = random_prompts(vocab(model), [5], seed=2, prefix=shared)
    rest = random_prompts(vocab(model), [1, 4, 9, 13, 2, 6, 11], seed=3, prefix=shared)
    engine = make_engine(model)
    run = run_all(engine, first, GREEDY)
    run2 = run_all(engine, rest, GREEDY)
    assert run.tokens == references(model, first, GREEDY.max_tokens)
    assert run2.tokens == references(model, rest, GREEDY.max_tokens)
    stats = run2.steps[-1].stats
    # each of the 7 later prompts reuses the 20 tokens of the shared prefix's 5 full blocks
    assert stats.prefix_cache_hits >= 7 * 20
    assert stats.prefix_cache_queries == sum(len(p) for p in [*first.values(), *rest.values()])


def test_preemption_keeps_outputs_equal(model: PreTrainedModel) -> None:
    prompts = random_prompts(vocab(model), LENGTHS, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    engine = make_engine(model, num_blocks=20, block_size=4)  # 80 slots for 8 requests of up to 65 tokens
    run = run_all(engine, prompts, params)
    assert run.steps[-1].stats.num_preemptions > 0
    assert run.tokens == references(model, prompts, params.max_tokens)
    assert engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_is_batch_invariant(model: PreTrainedModel) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    prompt = random_prompts(vocab(model), [9], seed=5)["r0"]
    alone = run_all(make_engine(model), {"me": prompt}, seeded).tokens["me"]

    engine = make_engine(model)
    others = random_prompts(vocab(model), [2, 5, 8, 11, 14, 17, 20, 3, 6, 9, 12, 15, 18, 21, 4, 7], seed=6)
    for index, (rid, other) in enumerate(others.items()):
        params = SamplingParams(max_tokens=12 + index, temperature=1.0, seed=index if index % 2 else None)
        engine.add_request(rid, other, params)
        if index == 7:
            engine.add_request("me", prompt, seeded)
    crowd = drain(engine)
    assert crowd.tokens["me"] == alone
    again = run_all(make_engine(model), {"me": prompt}, SamplingParams(max_tokens=16, temperature=0.9, seed=99))
    assert again.tokens["me"] != alone


def test_abort_frees_blocks_at_once(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    prompts = random_prompts(vocab(model), [30, 10], seed=8)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort(["r0", "r1", "unknown"])
    assert engine.block_manager.num_used_blocks == 0
    out = engine.step()
    assert {(o.request_id, o.finish_reason) for o in out.outputs} == {("r0", "abort"), ("r1", "abort")}
    assert not engine.has_work()


def test_stop_rules(model: PreTrainedModel) -> None:
    prompt = random_prompts(vocab(model), [6], seed=9)["r0"]
    free = run_all(make_engine(model), {"a": prompt}, SamplingParams(max_tokens=10, temperature=0.0))
    assert free.finish["a"] == "length" and len(free.tokens["a"]) == 10
    stop_at = free.tokens["a"][3]
    stopped = run_all(
        make_engine(model), {"a": prompt}, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at])
    )
    cut = free.tokens["a"].index(stop_at) + 1
    assert stopped.tokens["a"] == free.tokens["a"][:cut] and stopped.finish["a"] == "stop"
    held = run_all(
        make_engine(model),
        {"a": prompt},
        SamplingParams(max_tokens=10, min_tokens=10, temperature=0.0, stop_token_ids=[stop_at]),
    )
    assert len(held.tokens["a"]) == 10 and stop_at not in held.tokens["a"]


def test_context_limit_ends_with_length(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    limit = engine.max_model_len
    prompt = random_prompts(vocab(model), [limit - 3], seed=10)["r0"]
    run = run_all(engine, {"a": prompt}, SamplingParams(max_tokens=50, temperature=0.0))
    assert len(run.tokens["a"]) == 3 and run.finish["a"] == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], SamplingParams(), "prompt"),
        ([10**6], SamplingParams(), "prompt"),
        ([5], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        ([5] * 600, SamplingParams(), "prompt"),
    ],
)
def test_invalid_requests_are_refused(
    model: PreTrainedModel, prompt: list[int], params: SamplingParams, param: str
) -> None:
    engine = make_engine(model)
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("x", prompt, params)
    assert err.value.param == param
    assert not engine.has_work()


def test_request_larger_than_kv_cache_is_refused(model: PreTrainedModel) -> None:
    engine = make_engine(model, num_blocks=4, block_size=4)
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("x", [5] * 10, SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"


def test_invalid_sampling_params() -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(temperature=float("nan"))
    assert err.value.param == "temperature"
    with pytest.raises(InvalidRequest):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequest):
        SamplingParams(top_p=0.0)

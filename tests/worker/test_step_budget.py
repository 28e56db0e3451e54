"""The prompt chunk of a step follows the measured step costs: `StepBudget`'s arithmetic, the scheduler honouring it
while requests decode (and not otherwise), and an engine whose chunks it sizes still giving `generate`'s tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import make_engine, reference, run_all
from tests.worker.test_scheduler import Harness
from worker.messages import SamplingParams
from worker.step_budget import FALLBACK_FIXED_SECONDS, StepBudget


def test_no_bound_until_a_prompt_token_has_been_priced_or_when_nothing_decodes() -> None:
    budget = StepBudget(2048, ratio=2.0)
    assert budget.prompt_tokens(decodes=8) == 2048
    budget.observe(prompt_tokens=6, decodes=0, seconds=1.0)  # too many rows to price the fixed part, too few a token
    assert budget.token_seconds is None and budget.fixed_seconds is None
    budget.observe(prompt_tokens=1000, decodes=0, seconds=1.0)
    assert budget.prompt_tokens(decodes=0) == 2048
    assert budget.prompt_tokens(decodes=8) < 2048


def test_the_chunk_costs_ratio_times_a_decode_step_of_the_same_streams() -> None:
    budget = StepBudget(2048, ratio=2.0)
    budget.observe(prompt_tokens=0, decodes=1, seconds=0.010)  # the fixed part, before anything else is priced
    budget.observe(prompt_tokens=0, decodes=10, seconds=0.020)  # 1 ms a stream
    budget.observe(prompt_tokens=100, decodes=0, seconds=0.060)  # 0.5 ms a prompt token
    assert budget.fixed_seconds == pytest.approx(0.010)
    assert budget.stream_seconds == pytest.approx(0.001)
    assert budget.token_seconds == pytest.approx(0.0005)
    assert budget.decode_seconds(20) == pytest.approx(0.030)
    assert budget.prompt_tokens(decodes=10) == 80  # 2 x 20 ms / 0.5 ms
    assert budget.prompt_tokens(decodes=20) == 120  # 2 x 30 ms / 0.5 ms: more streams, a longer step to match
    # requests that wait decode beside the streams once their prompts are in: they count as streams, not the chunk
    assert budget.prompt_tokens(decodes=10, joining=10) == 120
    assert budget.prompt_tokens(decodes=0, joining=10) == 2048  # nothing decodes: nothing waits on the step
    budget.observe(prompt_tokens=120, decodes=20, seconds=0.030 + 0.120)  # a mixed step: the streams' share is known
    assert budget.token_seconds == pytest.approx(0.7 * 0.0005 + 0.3 * 0.120 / 120)
    slower = StepBudget(2048, ratio=2.0)  # a model that costs ten times as much a prompt token
    slower.observe(prompt_tokens=0, decodes=1, seconds=0.010)
    slower.observe(prompt_tokens=0, decodes=10, seconds=0.020)
    slower.observe(prompt_tokens=100, decodes=0, seconds=0.510)
    assert slower.prompt_tokens(decodes=1) == 8  # 4 tokens by the arithmetic, raised to the floor of 8


def test_under_steady_load_mixed_steps_keep_the_chunk_where_the_costs_put_it() -> None:
    """Prompts always waiting: every step carries decodes and a chunk, none is decode-only, and the only small steps
    were the first seconds'. Fed the steps a machine with a 17 ms fixed part and 0.9 ms a row gives, the chunk
    settles where the arithmetic says, not at the floor."""
    budget = StepBudget(2048, ratio=1.5)
    budget.observe(prompt_tokens=0, decodes=2, seconds=0.017 + 2 * 0.0009)
    budget.observe(prompt_tokens=2048, decodes=0, seconds=0.017 + 2048 * 0.0009)  # the first step: prompts only
    chunks = []
    for _ in range(40):
        chunk = budget.prompt_tokens(decodes=32)
        chunks.append(chunk)
        budget.observe(prompt_tokens=chunk, decodes=32, seconds=0.017 + (32 + chunk) * 0.0009)
    settled = int(1.5 * (0.017 + 32 * 0.0009) / 0.0009)  # 76 tokens
    assert all(abs(chunk - settled) <= 0.1 * settled for chunk in chunks[-10:]), chunks


def test_costs_are_moving_averages_and_the_chunk_stays_within_its_bounds() -> None:
    budget = StepBudget(64, ratio=4.0, min_chunk=8)
    budget.observe(prompt_tokens=0, decodes=1, seconds=0.010)
    budget.observe(prompt_tokens=0, decodes=1, seconds=0.020)
    assert budget.fixed_seconds == pytest.approx(0.013)
    budget.observe(prompt_tokens=10, decodes=0, seconds=0.0131)  # cheaper than the fixed part: half the step counts
    assert budget.token_seconds == pytest.approx(0.0131 / 2 / 10)
    assert budget.prompt_tokens(decodes=1) == 64  # cheap tokens: the token budget caps the chunk
    assert StepBudget(64, ratio=0.0).prompt_tokens(decodes=1) == 64  # ratio 0: no bound
    unpriced_fixed = StepBudget(4096, ratio=1.0)
    unpriced_fixed.observe(prompt_tokens=100, decodes=0, seconds=0.1)
    token = unpriced_fixed.token_seconds
    assert token is not None and token == pytest.approx((0.1 - FALLBACK_FIXED_SECONDS) / 100)
    assert unpriced_fixed.prompt_tokens(decodes=1) == int((FALLBACK_FIXED_SECONDS + token) / token)  # a stream: a token


def test_the_scheduler_caps_prompt_tokens_only_in_steps_that_carry_decodes() -> None:
    caps: list[tuple[int, int]] = []

    def budget(decodes: int, joining: int) -> int:
        caps.append((decodes, joining))
        return 5 if decodes else 64

    h = Harness(max_num_batched_tokens=64)
    h.sched.prompt_budget = budget
    h.add("a", [10, 11, 12], max_tokens=100)
    assert h.step().plan == [("a", 3, True)]  # nothing decodes yet: the whole budget is there
    h.add("b", list(range(100, 120)), max_tokens=2)
    h.add("c", list(range(200, 204)), max_tokens=2)
    plans = [h.step().plan for _ in range(5)]
    assert plans == [
        [("a", 1, True), ("b", 5, False)],
        [("a", 1, True), ("b", 5, False)],
        [("a", 1, True), ("b", 5, False)],
        [("a", 1, True), ("b", 5, True)],  # b caught up: it samples
        [("a", 1, True), ("b", 1, True), ("c", 4, True)],  # b now decodes; c's prompt fits the 5 left
    ]
    # (decoding, joining): b and c wait or prefill beside a, then c beside a and b
    assert caps == [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 1)]


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_an_engine_sizing_its_chunks_from_measured_costs_equals_generate(model: PreTrainedModel, ratio: float) -> None:
    engine = make_engine(model, max_num_batched_tokens=256, prefill_chunk_ratio=ratio)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request("short", [5, 6, 7, 8], greedy)
    while not engine.requests["short"].output_token_ids:
        engine.step()
    long_prompt = [(7 * i) % 200 + 3 for i in range(150)]
    # the step costs as measured: a step's fixed part is ~1 ms here, a row a sizeable share of it
    engine.step_budget.fixed_seconds, engine.step_budget.token_seconds = 0.001, 0.0001
    run = run_all(engine, {"long": long_prompt}, greedy)
    chunks = [step.stats.step_tokens for step in run.steps]
    assert max(chunks) < 150  # the long prompt was split while "short" decoded
    assert run.tokens["long"] == reference(model, long_prompt, 24)

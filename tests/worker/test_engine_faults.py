"""A step that fails fails only its own requests; out of memory costs the largest request; the engine goes on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import drain, make_engine, random_prompts, reference, run_all
from worker.faults import fault_hook
from worker.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_failed_step_fails_its_requests_and_frees_blocks(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    prompts = random_prompts(int(model.config.vocab_size), [5, 9], seed=1)
    marker = next(t for t in range(3, 100) if t not in prompts["r0"])
    engine.fault_hook = fault_hook(f"raise:{marker}")
    engine.add_request("ok-first", prompts["r0"], GREEDY)
    engine.step()  # ok-first is running alone
    engine.add_request("boom", [*prompts["r1"], marker], GREEDY)
    out = engine.step()  # ok-first decodes in the same step as boom's prefill: both fail
    errors = {o.request_id: o.error for o in out.outputs if o.finish_reason == "error"}
    assert set(errors) == {"ok-first", "boom"}
    assert {o.error_code for o in out.outputs if o.finish_reason == "error"} == {"model_error"}
    assert all(message and "injected fault" in message for message in errors.values())
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_work()
    # the engine keeps serving, with exact outputs
    again = run_all(engine, {"later": prompts["r0"]}, GREEDY)
    assert again.tokens["later"] == reference(model, prompts["r0"], GREEDY.max_tokens)


def test_out_of_memory_fails_the_largest_request_only(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    prompts = random_prompts(int(model.config.vocab_size), [4, 30, 7], seed=2)
    marker = prompts["r0"][0]
    assert marker not in prompts["r1"] + prompts["r2"]
    engine.add_request("small-oom", prompts["r0"], GREEDY)
    engine.add_request("big", prompts["r1"], GREEDY)
    engine.add_request("mid", prompts["r2"], GREEDY)
    engine.fault_hook = fault_hook(f"oom:{marker}")
    first = engine.step()
    assert [(o.request_id, o.finish_reason) for o in first.outputs] == [("big", "error")]
    assert first.outputs[0].error is not None and "out of memory" in first.outputs[0].error
    assert first.outputs[0].error_code == "out_of_memory"
    # the step keeps failing while small-oom runs: the largest remaining request goes each time
    second = engine.step()
    assert [(o.request_id, o.finish_reason) for o in second.outputs] == [("mid", "error")]
    engine.fault_hook = None
    run = drain(engine)
    assert run.tokens["small-oom"] == reference(model, prompts["r0"], GREEDY.max_tokens)
    assert engine.block_manager.num_used_blocks == 0


def test_fault_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="TOKENMILL_TEST_FAULT"):
        fault_hook("explode")
    with pytest.raises(ValueError, match="slow:MILLISECONDS"):
        fault_hook("slow:soon")
    with pytest.raises(ValueError, match="busy:TOKEN_ID:MILLISECONDS"):
        fault_hook("busy:7")
    with pytest.raises(ValueError, match="hang:TOKEN_ID"):
        fault_hook("raise:3,hang:soon")


def test_several_faults_and_a_busy_step() -> None:
    """`busy` computes for its time (CPU, not sleep: the watchdog must see a working step), only for its token."""
    hook = fault_hook("raise:3,busy:4:300")
    with pytest.raises(RuntimeError, match="injected fault"):
        hook([[1, 3]])
    wall, cpu = time.monotonic(), time.process_time()
    hook([[1, 2]])
    assert time.monotonic() - wall < 0.2
    hook([[4, 2]])
    assert time.monotonic() - wall >= 0.3
    assert time.process_time() - cpu > 0.03  # a sleep would use next to none, even on a loaded machine

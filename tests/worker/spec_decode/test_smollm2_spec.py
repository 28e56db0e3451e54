"""The real proposer on the real default model: a prompt SmolLM2 continues in its own words keeps many proposals,
and the greedy output is transformers' `generate`'s in fp32, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tests.worker.engine_harness import make_engine, reference, run_all
from worker.messages import SamplingParams
from worker.registry import SpeculativeSpec

pytestmark = pytest.mark.slow

FRUITS = ["apple", "banana", "cherry", "damson", "elderberry", "fig", "grape", "huckleberry", "kiwi", "lime"]
LISTING = "\n".join(f"{i}. {fruit}: {i * 3} crates, aisle {chr(65 + i)}" for i, fruit in enumerate(FRUITS, 1))


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_quoting_prompts_keep_proposals_and_equal_generate(model: PreTrainedModel, smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [f"{LISTING}\n{LISTING}\n1. apple", "def add(a, b):\n"]
    prompts = {f"p{i}": tokenizer(text)["input_ids"] for i, text in enumerate(texts)}
    params = SamplingParams(max_tokens=40, temperature=0.0)
    engine = make_engine(model, block_size=16, speculative=SpeculativeSpec(method="ngram", num_tokens=5))
    run = run_all(engine, prompts, params)
    assert run.tokens == {rid: reference(model, prompt, params.max_tokens) for rid, prompt in prompts.items()}
    assert engine.speculator is not None
    counts = engine.speculator.counts
    assert counts.num_accepted_tokens >= 20, counts  # the listing's copy keeps many of its tokens

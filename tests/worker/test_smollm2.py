"""The real default model: the engine's greedy tokens against transformers' `generate` in fp32, and the
attention-interface contract our plug-in relies on (pinned transformers; this test says when it breaks)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tests.worker.engine_harness import make_engine, reference, run_all
from worker.attention import ATTENTION_NAME
from worker.messages import SamplingParams
from worker.model_runner import BatchItem, ModelRunner

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "hi",
    "List three prime numbers and explain why each one is prime.",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 12 times 12?",
    "Tell me a short story about a robot who learns to paint, in two sentences.",
    "Why is the sky blue? Answer briefly, then give one fun fact about light, clouds or rainbows.",
]
MAX_TOKENS = 24
TIE = 1e-3


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(smollm2_dir: Path) -> dict[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return {
        f"q{i}": cast(
            list[int],
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            ),
        )
        for i, q in enumerate(QUESTIONS)
    }


def top_two_gap(model: PreTrainedModel, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(2).values
    return float(top[0] - top[1])


def test_greedy_equals_generate_up_to_ties(model: PreTrainedModel, prompts: dict[str, list[int]]) -> None:
    engine = make_engine(model, num_blocks=512, block_size=16)
    run = run_all(engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for rid, prompt in prompts.items():
        want = reference(model, prompt, MAX_TOKENS)
        got = run.tokens[rid]
        if got == want:
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        gap = top_two_gap(model, prompt + want[:first])
        assert gap < TIE, f"{rid}: diverged at token {first} where the reference's top two differ by {gap:.2e}"


def test_attention_plugin_matches_hf_logits(model: PreTrainedModel, prompts: dict[str, list[int]]) -> None:
    """The contract with transformers: our function receives post-RoPE q/k, packed position ids give correct RoPE,
    and no mask is built for our attention name. If a transformers upgrade breaks any of it, this fails."""
    runner = ModelRunner(make_engine(model, num_blocks=64, block_size=16).runner.model, 64, 16, torch.device("cpu"))
    assert runner.model.config._attn_implementation == ATTENTION_NAME
    ids = [prompts["q0"], prompts["q3"]]
    tables = [list(range(0, 8)), list(range(8, 16))]
    logits = runner.execute([BatchItem(p, 0, t, True) for p, t in zip(ids, tables, strict=True)])
    with torch.inference_mode():
        for row, prompt in enumerate(ids):
            want = model(torch.tensor([prompt])).logits[0, -1].float()
            assert torch.allclose(logits[row], want, atol=1e-3), (logits[row] - want).abs().max()

"""Helpers shared by the engine tests: build an engine over a model, drive it to completion, and the reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from worker.engine import Engine
from worker.messages import SamplingParams, StepOutput


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    steps: list[StepOutput] = field(default_factory=list)


def make_engine(
    model: PreTrainedModel, *, num_blocks: int | None = 256, block_size: int = 4, **kwargs: object
) -> Engine:
    """An engine over a private copy of `model` (on the model's device), so the reference keeps HF's own attention."""
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None else []
    return Engine(
        copy.deepcopy(model),
        name="test",
        max_model_len=int(config.max_position_embeddings),
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos),
        device=next(model.parameters()).device,
        num_blocks=num_blocks,
        block_size=block_size,
        **kwargs,  # type: ignore[arg-type]
    )


def drain(engine: Engine, run: Run | None = None, max_steps: int = 10_000) -> Run:
    run = run or Run()
    for _ in range(max_steps):
        if not engine.has_work():
            return run
        out = engine.step()
        run.steps.append(out)
        for item in out.outputs:
            run.tokens.setdefault(item.request_id, []).extend(item.new_token_ids)
            if item.finish_reason is not None:
                run.finish[item.request_id] = item.finish_reason
    raise AssertionError(f"engine still busy after {max_steps} steps")


def run_all(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> Run:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine)


def greedy_generate(model: PreTrainedModel, prompt: list[int], max_tokens: int, **kwargs: Any) -> Any:
    """transformers' own greedy `generate` of one prompt (no padding) on the model's device; `kwargs` go to it."""
    eos = model.config.eos_token_id
    device = next(model.parameters()).device
    with torch.inference_mode():
        return cast(Any, model).generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if isinstance(eos, int) else 0,
            **kwargs,
        )


def reference(model: PreTrainedModel, prompt: list[int], max_tokens: int) -> list[int]:
    """The tokens of transformers' greedy `generate`, one prompt at a time (no padding), on the model's device."""
    return [int(t) for t in greedy_generate(model, prompt, max_tokens)[0, len(prompt) :]]


def random_prompts(
    vocab: int, lengths: list[int], seed: int = 0, prefix: list[int] | None = None
) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"r{i}": (prefix or []) + torch.randint(3, vocab, (n,), generator=gen).tolist() for i, n in enumerate(lengths)
    }

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


# A divergence from the reference is allowed where the reference rated the token taken instead within this many nats of
# its own best: a near-tie that rounding can flip. bfloat16 keeps 8 significant bits, so the tiny models' logits (up to
# about 7.5) lie on a grid of 2**-5 and top-2 pairs often tie outright. On CPU, over the torch paths a CUDA engine
# takes (TOKENMILL_NATIVE=0), summing in another order (packed batches, chunks, paged attention) moved a token's logprob
# by 0.02 nats typically and 0.14 at most, and swapped pairs up to 0.19 nats apart: 3 of 600 requests went past 0.1.
# 0.25 covers them with a margin yet stays under the median top-2 gap (0.35-0.4 nats); a real fault (a wrong position,
# a swapped block) moves logits by whole nats.
NEAR_TIE_NATS = 0.25


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


@dataclass
class Reference:
    """`generate`'s greedy tokens and its own log-probabilities at each of them, [len(tokens), vocab] on the CPU."""

    tokens: list[int]
    logprobs: torch.Tensor


def reference_with_logprobs(model: PreTrainedModel, prompt: list[int], max_tokens: int) -> Reference:
    """transformers' own greedy `generate`, one prompt at a time (no padding), keeping the raw logits of each step."""
    out = greedy_generate(model, prompt, max_tokens, output_logits=True, return_dict_in_generate=True)
    tokens = [int(t) for t in out.sequences[0, len(prompt) :]]
    logprobs = torch.stack([step[0] for step in out.logits]).float().log_softmax(dim=-1).cpu()
    assert logprobs.shape[0] == len(tokens)
    return Reference(tokens, logprobs)


def divergence(got: list[int], ref: Reference, tolerance: float = NEAR_TIE_NATS) -> int | None:
    """Where `got` first leaves the reference (None: nowhere), failing unless that step was a near-tie.

    The rule for computations that round differently from the reference (bfloat16, quantized matmuls that depend on
    the batch): the tokens equal the reference's up to the first divergence; at it, the token taken instead must be
    one the reference itself rated within `tolerance` nats of its own best, so the two can only have swapped places
    by rounding. After it the contexts differ and the rest is not compared.
    """
    for index, (token, expected) in enumerate(zip(got, ref.tokens, strict=False)):
        if token == expected:
            continue
        logprobs = ref.logprobs[index]
        behind = float(logprobs.max() - logprobs[token])
        top2 = [round(float(v), 4) for v in logprobs.topk(2).values]
        assert behind <= tolerance, (
            f"token {index}: took {token}, {behind:.4f} nats behind the reference's {expected} (top-2 logprobs "
            f"{top2}), more than the {tolerance} nats a rounding difference can explain; got {got}, "
            f"expected {ref.tokens}"
        )
        return index
    assert len(got) == len(ref.tokens), f"same tokens but a different length: got {got}, expected {ref.tokens}"
    return None


def assert_near_ties_only(got: dict[str, list[int]], refs: dict[str, Reference]) -> None:
    assert got.keys() == refs.keys()
    for rid, ref in refs.items():
        divergence(got[rid], ref)

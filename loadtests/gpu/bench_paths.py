"""The three ways the GPU benchmark generates: the engine, transformers' padded `generate` and transformers' own
continuous batching (`generate_batch`). Each takes prompts and returns every request's output tokens, greedy."""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel

from worker.engine import Engine
from worker.loader import LoadedModel
from worker.messages import SamplingParams
from worker.registry import ModelEntry

PATHS = ("engine", "generate", "generate_batch")
PAGE = 256  # tokens: the largest KV block either side uses by default (flash-attn's page, transformers' page_size)


@dataclass
class DecodeSteps:
    """The engine steps of a run in which every request decoded one token (all past prefill, none finished)."""

    count: int
    mean_ms: float  # wall time
    mean_bytes: float  # read: all weights plus the KV of every request's context


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate(model: PreTrainedModel, prompts: list[list[int]], n: int) -> list[list[int]]:
    """One padded batch (left padding) through `generate`; the model's generation config has no EOS, so all `n`."""
    pad = int(model.config.get_text_config().pad_token_id or 0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        out = cast(Any, model).generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    tokens: list[list[int]] = out[:, width:].tolist()
    return tokens


def cb_config(args: argparse.Namespace) -> ContinuousBatchingConfig:
    """transformers' continuous batching sized for the largest batch as its own hints would size it for one call (the
    warm-up's hints would size the manager that every later call reuses), with the engine's token budget."""
    per_request = -(-(args.prompt_len + args.output_len) // PAGE) + 1
    # the page's field is `page_size` in newer transformers, `block_size` before (5.17, say)
    fields = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    page: dict[str, Any] = {"page_size" if "page_size" in fields else "block_size": PAGE}
    return ContinuousBatchingConfig(
        **page,
        num_blocks=max(args.batches) * per_request,
        max_batch_tokens=args.max_batched_tokens,
        max_requests_per_batch=max(args.batches),
        max_blocks_per_request=per_request + per_request % 2,
    )


def run_generate_batch(
    model: PreTrainedModel, prompts: list[list[int]], n: int, cb: ContinuousBatchingConfig
) -> list[list[int]]:
    """`generate_batch`; its manager (KV cache, CUDA graphs) persists across the calls of one model."""
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)  # -1: no EOS
    results = cast(Any, model).generate_batch(
        inputs=prompts, generation_config=config, continuous_batching_config=cb, persistent_manager=True
    )
    outputs = list(results.values())
    errors = [str(out.error) for out in outputs if out.error is not None]
    if errors or len(outputs) != len(prompts):
        raise RuntimeError(f"{len(outputs)} of {len(prompts)} requests came back; {errors[:1]}")
    return [list(out.generated_tokens) for out in outputs]


def make_engine(
    model: PreTrainedModel, name: str, source: Path, kv_bytes_per_token: int, args: argparse.Namespace
) -> Engine:
    """The engine as the server makes it (`Engine.from_loaded`: its own block size, CUDA graphs and attention), with
    a KV pool for the largest batch at full length, whatever the block size, and a context limit just above the
    workload's (decode graphs are captured up to it)."""
    config = model.config.get_text_config()
    eos = config.eos_token_id
    fields: dict[str, Any] = {
        "name": name,
        "source": str(source),
        "load_format": "dummy",
        "dtype": args.dtype,
        "device": str(model.device),
        "kv_cache_memory": kv_bytes_per_token * max(args.batches) * (args.prompt_len + args.output_len + PAGE),
        "max_num_seqs": max(args.batches),
        "max_num_batched_tokens": args.max_batched_tokens,
    }
    if args.block_size is not None:
        fields["block_size"] = args.block_size
    loaded = LoadedModel(
        model=model,
        tokenizer=cast(Any, None),  # the engine reads token ids only
        config=model.config,
        device=model.device,
        dtype=model.dtype,
        max_model_len=min(int(config.max_position_embeddings), -(-(args.prompt_len + args.output_len) // PAGE) * PAGE),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        weights_path=source,
        converted=False,
    )
    return Engine.from_loaded(loaded, ModelEntry.model_validate(fields))


def engine_has_cuda_graphs(device: torch.device) -> bool:
    """Whether the engine captures CUDA graphs as served by default (a model entry's `cuda_graphs`), on this device."""
    return device.type == "cuda" and getattr(ModelEntry(name="x", source="x"), "cuda_graphs", False) is True


def run_engine(
    engine: Engine, prompts: list[list[int]], n: int, tag: str, weight_bytes: int, kv_bytes_per_token: int
) -> tuple[list[list[int]], DecodeSteps | None]:
    """All requests at once, each step timed; request ids start with `tag`, unique per engine."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    finished = 0
    errors: list[str] = []
    times: list[float] = []
    read: list[int] = []
    try:
        while engine.has_work():
            decoding = finished == 0 and all(tokens.values())
            sync(engine.device)
            start = time.perf_counter()
            out = engine.step()
            sync(engine.device)
            if decoding:
                times.append(time.perf_counter() - start)
                context = sum(len(p) + len(tokens[r]) for r, p in zip(ids, prompts, strict=True))
                read.append(weight_bytes + context * kv_bytes_per_token)
            for item in out.outputs:
                if item.request_id not in tokens:  # the abort of an earlier run's leftover
                    continue
                tokens[item.request_id].extend(item.new_token_ids)
                finished += item.finish_reason is not None
                errors += [item.error] if item.error else []
    finally:
        engine.abort(ids)  # after a raising step, so that the next run starts on an idle engine
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(ids)} requests failed; the first: {errors[0]}")
    steps = DecodeSteps(len(times), 1000 * sum(times) / len(times), sum(read) / len(read)) if times else None
    return [tokens[request_id] for request_id in ids], steps

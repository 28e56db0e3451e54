"""The GPU benchmark: the engine against transformers' `generate` and its own continuous batching (`generate_batch`)
on one device in one run, and the engine's decode step against the memory-bandwidth limit. Models of the published
configs (`loadtests/dummy_configs`, or `--config`) with random weights, built on the device: nothing is downloaded.

    python -m loadtests.gpu.bench --out DIR [--device cuda] [--models llama-3.2-1b llama-3.1-8b]
        [--batches 1 8 64 256] [--prompt-len 128] [--output-len 128] [--config PATH ...] [--time-limit 270]

For each model, path and batch size B: B prompts of random token ids decode output-len tokens each (EOS ignored),
first as a warm-up of a few tokens, then timed. DIR/bench.json and DIR/bench.md (loadtests.gpu.bench_report) are
rewritten after each measurement, so a run cut short keeps what it measured; a path that fails is recorded and the
run goes on; past --time-limit nothing new starts.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig, PreTrainedModel

from loadtests import dummy_models
from loadtests.bench_engine import SEED
from loadtests.gpu import bench_paths, bench_report
from loadtests.gpu.bench_paths import PATHS, sync
from worker.engine import Engine
from worker.model_runner import kv_bytes_per_token

DEFAULT_MODELS = ["llama-3.2-1b", "llama-3.1-8b"]
log = logging.getLogger("tokenmill.bench")
SKIPPED = "skipped: past --time-limit"
LOWEST_ID = 100  # prompts avoid the low ids, where vocabularies keep their special tokens


@dataclass
class Run:
    """One timed pass of one path at one batch size; `tokens` (each request's output) is kept out of the JSON."""

    path: str
    batch: int
    output_tokens: int = 0
    seconds: float = 0.0
    peak_mib: float = 0.0
    error: str | None = None
    decode_steps: int = 0  # engine steps in which every request decoded one token
    decode_step_ms: float | None = None  # their mean wall time
    decode_bytes: float | None = None  # their mean bytes read: all weights plus the KV of every request's context
    tokens: list[list[int]] = field(default_factory=list)


@dataclass
class Model:
    """One benchmarked model: its config, its sizes once built, and its runs."""

    name: str
    config: Path
    parameters: int = 0
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    build_s: float = 0.0
    engine_block_size: int = 0
    engine_paths: str = ""  # the engine's own account of its forward, attention and graphs
    checksums: list[float] = field(default_factory=list)  # of the weights, per build: equal when builds agree
    runs: list[Run] = field(default_factory=list)


@dataclass
class Paths:
    """What the paths run on for one build of a model; the engine is made at its first use."""

    model: PreTrainedModel
    spec: Model
    args: argparse.Namespace
    cb: ContinuousBatchingConfig | str  # a str: why transformers' continuous batching could not be configured
    save: Callable[[], object]  # writes the report so far
    engine: Engine | None = None
    engine_error: str | None = None  # the engine would not start: every batch size fails alike, without a retry


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """GPU memory allocated at most since the last reset; on CPU the process's peak RSS, which never resets."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 8) -> float:
    """Bytes per second of a device-to-device copy of `mib` MiB (read plus written), the best of `repeats`."""
    src = torch.ones(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def prompts_for(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    low = min(LOWEST_ID, vocab // 2)
    ids: list[list[int]] = torch.randint(
        low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    return ids


def build(spec: Model, device: torch.device, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """Random weights of the config's shapes, made on the device; generation never stops at EOS."""
    config = AutoConfig.from_pretrained(spec.config)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    sync(device)
    spec.build_s = time.perf_counter() - start
    spec.checksums.append(sum(float(p.sum(dtype=torch.float32)) for p in model.parameters()))
    spec.parameters = sum(p.numel() for p in model.parameters())
    spec.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec.kv_bytes_per_token = kv_bytes_per_token(model, dtype)
    return cast(PreTrainedModel, model)


def run_path(path: str, paths: Paths, prompts: list[list[int]], n: int, tag: str, run: Run) -> list[list[int]]:
    model, spec = paths.model, paths.spec
    if path == "generate":
        return bench_paths.run_generate(model, prompts, n)
    if path == "generate_batch":
        if isinstance(paths.cb, str):
            raise RuntimeError(paths.cb)
        return bench_paths.run_generate_batch(model, prompts, n, paths.cb)
    if paths.engine_error is not None:
        raise RuntimeError(paths.engine_error)
    if paths.engine is None:
        try:
            paths.engine = bench_paths.make_engine(model, spec.name, spec.config, spec.kv_bytes_per_token, paths.args)
        except Exception as exc:
            paths.engine_error = f"the engine would not start: {type(exc).__name__}: {exc}"
            raise
        spec.engine_block_size = paths.engine.block_manager.block_size
        graphs = paths.engine.runner.graphs
        spec.engine_paths = paths.engine.runner.describe() + (
            f"; {len(graphs.shapes)} decode graphs" if graphs is not None else "; no decode graphs"
        )
    tokens, steps = bench_paths.run_engine(paths.engine, prompts, n, tag, spec.weight_bytes, spec.kv_bytes_per_token)
    if steps is not None:
        run.decode_steps, run.decode_step_ms, run.decode_bytes = steps.count, steps.mean_ms, steps.mean_bytes
    return tokens


def measure(paths: Paths, names: list[str], deadline: float) -> None:
    """The named paths at every batch size, each warmed up at that size with its own prompts, then timed."""
    args, spec, device = paths.args, paths.spec, paths.model.device
    vocab = int(paths.model.config.get_text_config().vocab_size)
    for path in names:
        for batch in args.batches:
            run = Run(path, batch)
            spec.runs.append(run)
            if time.perf_counter() > deadline:
                run.error = SKIPPED
                continue
            try:
                warmup = prompts_for(vocab, batch, args.prompt_len, args.seed + 2 * batch + 1)
                run_path(path, paths, warmup, args.warmup_tokens, f"w{batch}", Run(path, batch))
                prompts = prompts_for(vocab, batch, args.prompt_len, args.seed + 2 * batch)
                reset_peak(device)
                sync(device)
                start = time.perf_counter()
                run.tokens = run_path(path, paths, prompts, args.output_len, f"t{batch}", run)
                sync(device)
                run.seconds = time.perf_counter() - start
                run.peak_mib = peak_mib(device)
                run.output_tokens = sum(len(t) for t in run.tokens)
                if run.output_tokens != batch * args.output_len:
                    run.error = f"{run.output_tokens} output tokens, expected {batch * args.output_len}"
            except Exception as exc:  # one failure must not lose the other measurements
                run.error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("%s: %s at batch %d failed", spec.name, path, batch)
            speed = f"{run.output_tokens / run.seconds:.1f} tok/s" if run.error is None else run.error
            print(f"{spec.name} {path} batch {batch}: {speed}", flush=True)
            paths.save()
        if path == "generate_batch":
            try:
                cast(Any, paths.model).destroy_cached_continuous_batching_manager()
            except Exception:  # the runs are recorded; a manager that will not stop goes with the model
                log.exception("%s: transformers' continuous batching manager would not stop", spec.name)


def bench_model(spec: Model, args: argparse.Namespace, deadline: float, save: Callable[[], object]) -> None:
    """The engine first (its numbers matter most if time runs out), then the baselines on a fresh build of the same
    weights: the engine takes the model's attention and weights over. Each build is let go before the next."""
    device = torch.device(args.device)
    for group in (["engine"], ["generate", "generate_batch"]):
        names = [path for path in group if path in args.paths]
        if not names:
            continue
        if time.perf_counter() > deadline:
            spec.runs += [Run(path, batch, error=SKIPPED) for path in names for batch in args.batches]
            continue
        try:
            model = build(spec, device, getattr(torch, args.dtype), args.seed)
        except Exception as exc:  # every run on this build fails alike
            log.exception("%s: the model would not build", spec.name)
            error = f"{type(exc).__name__}: {exc}"[:500]
            spec.runs += [Run(path, batch, error=error) for path in names for batch in args.batches]
            continue
        try:
            cb: ContinuousBatchingConfig | str = bench_paths.cb_config(args)
        except Exception as exc:  # another transformers' fields: only generate_batch's runs fail
            cb = f"continuous batching config: {type(exc).__name__}: {exc}"
        measure(Paths(model, spec, args, cb, save), names, deadline)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def model_specs(args: argparse.Namespace) -> list[Model]:
    names = args.models if args.models is not None else [] if args.config else DEFAULT_MODELS
    specs = [Model(name, dummy_models.CONFIGS / name) for name in names]
    for path in args.config:
        directory = path if path.is_dir() else path.parent
        specs.append(Model(directory.name, directory))
    return specs


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", choices=dummy_models.NAMES, default=None)
    parser.add_argument("--config", nargs="*", type=Path, default=[], help="config.json (or its directory) to add")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup-tokens", type=int, default=4, help="output tokens of each warm-up pass")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=None, help="the engine's KV block size (default: its own)")
    parser.add_argument("--max-batched-tokens", type=int, default=2048, help="token budget of a step, for both")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth probe's copy")
    parser.add_argument("--time-limit", type=float, default=270.0, help="seconds; later measurements are skipped")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    deadline = start + args.time_limit
    device = torch.device(args.device)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # its warnings repeat every call
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "batches": args.batches,
        "copy_gb_s": copy_bandwidth(device, args.copy_mib) / 1e9,
        "engine_cuda_graphs": bench_paths.engine_has_cuda_graphs(device),
        "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (cumulative)",
    }
    specs = model_specs(args)
    done: list[Model] = []

    def save() -> str:
        meta["seconds"] = time.perf_counter() - start
        return bench_report.write(args.out, meta, done)

    for spec in specs:
        done.append(spec)
        bench_model(spec, args, deadline, save)
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a decode step of the engine goes on a GPU: one request (or --batch) decoding on a random-weight model, a
few steps profiled with torch's profiler (CPU and CUDA). It prints the wall time a step, the GPU's busy time a step
(kernels and copies), the ops by self CPU time and the kernels by CUDA time, and writes them to --out.

    python -m loadtests.gpu.profile_decode --out DIR [--models llama-3.2-1b] [--batch 1] [--steps 20]

A step whose wall time is well above its GPU time is bound by the host (Python, scheduling, launches, syncs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loadtests import dummy_models
from loadtests.bench_engine import SEED
from loadtests.gpu import bench
from loadtests.gpu.bench_paths import make_engine, sync
from worker.messages import SamplingParams


def profile_model(name: str, args: argparse.Namespace) -> dict[str, object]:
    spec = bench.Model(name, dummy_models.CONFIGS / name)
    device = torch.device(args.device)
    model = bench.build(spec, device, getattr(torch, args.dtype), SEED)
    engine_args = argparse.Namespace(
        dtype=args.dtype, batches=[args.batch], prompt_len=128, output_len=args.steps * 3, block_size=None,
        max_batched_tokens=2048,
    )  # fmt: skip
    engine = make_engine(model, name, spec.config, spec.kv_bytes_per_token, engine_args)
    vocab = int(model.config.get_text_config().vocab_size)
    prompts = bench.prompts_for(vocab, args.batch, 128, SEED)
    params = SamplingParams(max_tokens=args.steps * 3, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    for _ in range(args.steps):  # prefill, then decodes until the graphs are warm
        engine.step()
    sync(device)
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            engine.step()
            sync(device)
            walls.append(time.perf_counter() - start)
    engine.abort([str(i) for i in range(args.batch)])
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]
    by_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:20]
    steps = len(walls)
    result: dict[str, object] = {
        "model": name,
        "paths": engine.runner.describe(),
        "batch": args.batch,
        "wall_ms_per_step": 1000 * sum(walls) / steps,
        "best_wall_ms": 1000 * min(walls),
        "gpu_busy_ms_per_step": gpu_us / 1000 / steps,
        "top_self_cpu_ms_per_step": [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in by_cpu],
        "top_cuda_ms_per_step": [(e.key, e.self_device_time_total / 1000 / steps, e.count // steps) for e in by_gpu],
    }
    del engine, model
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", choices=dummy_models.NAMES, default=["llama-3.2-1b"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [profile_model(name, args) for name in args.models]
    (args.out / "profile.json").write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"\n{result['model']} batch {result['batch']}: {result['paths']}")
        print(
            f"wall {result['wall_ms_per_step']:.2f} ms a step (best {result['best_wall_ms']:.2f}), "
            f"GPU busy {result['gpu_busy_ms_per_step']:.2f} ms a step"
        )
        for title, key in (("self CPU", "top_self_cpu_ms_per_step"), ("CUDA", "top_cuda_ms_per_step")):
            print(f"top by {title} time (ms a step, calls a step):")
            for op, ms, calls in result[key]:  # type: ignore[attr-defined]
                print(f"  {ms:8.3f}  {calls:4d}  {op[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

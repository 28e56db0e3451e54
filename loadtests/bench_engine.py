"""Offline throughput: the engine against transformers' padded `generate`, same model, same workload, same run.

128 requests with prompt and output lengths from a fixed-seed spread (outputs 16-256 tokens, ignore_eos). The
baseline runs them in arrival order in padded batches of 32, each batch lasting until its longest request ends (a
server without continuous batching); the engine takes them all with max_num_seqs 32. Also batch 1 for both.
Each measurement runs in its own process so peak RSS is its own. Usage:

    python -m loadtests.bench_engine [--dtypes float32 bfloat16] [--requests 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from worker.registry import DEFAULT_REGISTRY, load_registry

SEED = 1234


@dataclass
class Result:
    mode: str
    dtype: str
    batch: str
    requests: int
    output_tokens: int
    seconds: float
    peak_rss_mib: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def workload(requests: int, vocab: int, seed: int = SEED) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs: prompts 16-512 tokens, outputs 16-256, both skewed short."""
    rng = random.Random(seed)
    items = []
    for _ in range(requests):
        prompt_len = int(16 * 32 ** rng.random())  # log-uniform in [16, 512)
        output_len = int(16 * 16 ** rng.random())  # log-uniform in [16, 256)
        items.append(([rng.randrange(100, vocab) for _ in range(prompt_len)], output_len))
    return items


def run_child(args: argparse.Namespace) -> Result:
    import torch

    from worker.engine import Engine
    from worker.loader import load_model
    from worker.messages import SamplingParams
    from worker.runtime import configure_threads

    configure_threads(args.threads)
    entry = (
        load_registry(args.models)
        .models[0]
        .model_copy(update={"dtype": args.dtype, "max_num_seqs": 32, "kv_cache_memory": 1 << 30})
    )
    loaded = load_model(entry)
    vocab = int(loaded.config.vocab_size)
    items = workload(args.requests, vocab)
    if args.batch == "1":
        items = items[: args.single]
    useful = sum(n for _, n in items)
    start = time.perf_counter()
    if args.mode == "engine":
        engine = Engine.from_loaded(loaded, entry)
        if args.batch == "1":
            for index, (prompt, n) in enumerate(items):
                engine.add_request(str(index), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                while engine.has_work():
                    engine.step()
        else:
            for index, (prompt, n) in enumerate(items):
                engine.add_request(str(index), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            while engine.has_work():
                engine.step()
    else:
        size = 1 if args.batch == "1" else 32
        model = loaded.model
        pad = loaded.eos_token_ids[0]
        with torch.inference_mode():
            for first in range(0, len(items), size):
                batch = items[first : first + size]
                width = max(len(p) for p, _ in batch)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
                longest = max(n for _, n in batch)
                cast(Any, model).generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=longest,
                    min_new_tokens=longest,
                    do_sample=False,
                    pad_token_id=pad,
                )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Result(args.mode, args.dtype, args.batch, len(items), useful, seconds, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(DEFAULT_REGISTRY))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--single", type=int, default=6, help="requests run one at a time for the batch-1 numbers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["engine", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--batch", choices=["1", "mixed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(run_child(args))))
        return 0

    results: list[Result] = []
    for dtype in args.dtypes:
        for batch in ("mixed", "1"):
            for mode in ("generate", "engine"):
                cmd = [sys.executable, "-m", "loadtests.bench_engine", "--child", "--mode", mode, "--dtype", dtype]
                cmd += ["--batch", batch, "--models", args.models, "--requests", str(args.requests)]
                cmd += ["--single", str(args.single)] + (["--threads", str(args.threads)] if args.threads else [])
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                result = Result(**json.loads(line))
                results.append(result)
                print(
                    f"{dtype:9} {batch:5} {mode:8} {result.output_tokens:6d} tok {result.seconds:7.1f} s "
                    f"{result.tokens_per_s:7.1f} tok/s  peak RSS {result.peak_rss_mib:6.0f} MiB",
                    flush=True,
                )
    print("\n| dtype | workload | generate tok/s | engine tok/s | ratio | peak RSS generate / engine |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for batch in ("mixed", "1"):
            base, ours = (
                next(r for r in results if (r.dtype, r.batch, r.mode) == (dtype, batch, m))
                for m in ("generate", "engine")
            )
            label = f"{args.requests} mixed" if batch == "mixed" else f"batch 1 ({args.single} requests)"
            print(
                f"| {dtype} | {label} | {base.tokens_per_s:.1f} | {ours.tokens_per_s:.1f} | "
                f"{ours.tokens_per_s / base.tokens_per_s:.2f}x | "
                f"{base.peak_rss_mib:.0f} / {ours.peak_rss_mib:.0f} MiB |"
            )
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

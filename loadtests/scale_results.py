"""What the scale benchmark (`loadtests.scale`) measures and concludes: its workloads, the results of one model's run
(every server, every workload), the tables, the targets met or not, and the growth of costs across the models
measured so far. No I/O here but the figure's file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench_itl import Level
from loadtests.comparison import Target
from loadtests.load import Report

TOKENMILL = "tokenmill"
VLLM = "vllm-cpu-bf16"
LLAMA_BF16 = "llama.cpp-bf16"
TARGET_MODEL = "llama-3.2-1b"  # the model the targets are set for; the other models' runs show them too
SPEED_OVER_VLLM = 1.2
ITL_RATIO_LIMIT = 3.0
RSS_OVER_BUDGET = 1.3
GIB = 1 << 30
PREEMPTION_COUNTERS = ("tokenmill_num_preemptions_total", "vllm:num_preemptions_total")


@dataclass(frozen=True)
class Workload:
    key: str
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    requests: int

    @property
    def label(self) -> str:
        return f"c={self.concurrency}, {self.prompt_tokens:,}+{self.max_tokens}"


WORKLOADS = (
    Workload("c1", 1, 256, 128, 4),
    Workload("c8", 8, 256, 128, 16),
    Workload("c32", 32, 256, 128, 32),
    Workload("long-c8", 8, 2048, 16, 8),  # prefill-bound: TTFT of prompts queued behind each other
    Workload("long-1", 1, 6000, 16, 1),  # one long prompt alone: its TTFT
)
ITL_PROMPT_TOKENS = 2048
ITL_STREAMS = 8
ITL_STREAM_TOKENS = 300
ITL_STREAM_PROMPT = 32  # a stream's prompt is a short sentence: at most this many tokens


def kv_tokens(workloads: tuple[Workload, ...] | list[Workload], headroom: float = 1.25, multiple: int = 1024) -> int:
    """KV-cache tokens the workloads hold at once at most (and the inter-token latency run's), with `headroom`,
    rounded up to a `multiple`."""
    held = [w.concurrency * (w.prompt_tokens + w.max_tokens) for w in workloads]
    held.append(ITL_STREAMS * (ITL_STREAM_PROMPT + ITL_STREAM_TOKENS) + ITL_PROMPT_TOKENS + 1)
    return math.ceil(max(held) * headroom / multiple) * multiple


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Keys and values of every layer for one token, from a transformers config."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * int(config["num_hidden_layers"]) * int(kv_heads) * int(head_dim) * dtype_bytes


def kv_gib(tokens: int, bytes_per_token: int) -> int:
    """Whole GiB (vLLM's unit for its CPU KV cache) that hold `tokens`."""
    return max(1, math.ceil(tokens * bytes_per_token / GIB))


@dataclass
class WorkloadResult:
    key: str
    label: str
    requests: int
    failed: int  # errors, and replies short of max_tokens
    seconds: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    peak_rss: int  # bytes, the server's process tree, while this workload ran
    preemptions: int | None  # None: the server does not count them
    prompt_tokens: int  # as sent
    counted_prompt_tokens: list[int] = field(default_factory=list)  # as each server's usage counted them
    first_error: str = ""


def workload_result(
    workload: Workload, report: Report, peak_rss: int, preemptions: int | None, counted: list[int]
) -> WorkloadResult:
    return WorkloadResult(
        key=workload.key,
        label=workload.label,
        requests=report.requests,
        failed=report.errors + report.bad_token_counts,
        seconds=report.seconds,
        output_tokens=report.output_tokens,
        tokens_per_s=report.tokens_per_s,
        ttft_p50=report.ttft_p50,
        ttft_p99=report.ttft_p99,
        itl_p50=report.itl_p50,
        itl_p99=report.itl_p99,
        peak_rss=peak_rss,
        preemptions=preemptions,
        prompt_tokens=workload.prompt_tokens,
        counted_prompt_tokens=sorted(set(counted)),
        first_error=report.first_error,
    )


@dataclass
class ItlResult:
    level: Level
    peak_rss: int
    preemptions: int | None


@dataclass
class ServerRun:
    name: str
    weights: str
    workloads: list[WorkloadResult] = field(default_factory=list)
    itl: ItlResult | None = None
    peak_rss: int = 0
    quiet_load: float = 0.0
    quiet_wait: float = 0.0
    quiet: bool = True
    note: str = ""  # why it is incomplete, if it is

    def at(self, key: str) -> WorkloadResult | None:
        return next((w for w in self.workloads if w.key == key), None)

    @property
    def failed(self) -> int:
        streams = self.itl.level.stream_errors if self.itl else 0
        return sum(w.failed for w in self.workloads) + streams


@dataclass
class ModelRun:
    model: str
    parameters: int
    weight_bytes: int
    kv_bytes: int  # tokenmill's and vLLM's KV budget
    kv_tokens: int  # llama-server's context
    servers: list[ServerRun] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)

    def server(self, name: str) -> ServerRun | None:
        return next((s for s in self.servers if s.name == name), None)


def model_run(data: dict[str, Any]) -> ModelRun:
    """A ModelRun from its report.json (dataclasses.asdict of it)."""
    servers = []
    for raw in data["servers"]:
        itl = raw.get("itl")
        servers.append(
            ServerRun(
                **{k: v for k, v in raw.items() if k not in ("workloads", "itl")},
                workloads=[WorkloadResult(**w) for w in raw["workloads"]],
                itl=ItlResult(Level(**itl["level"]), itl["peak_rss"], itl["preemptions"]) if itl else None,
            )
        )
    return ModelRun(**{k: v for k, v in data.items() if k != "servers"}, servers=servers)


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} s"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 1000:.0f} ms"


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB" if value else "n/a"


def workload_table(run: ModelRun) -> list[str]:
    lines = [
        "| server | workload | requests | failed | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | peak RSS "
        "| preemptions | prompt tokens counted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server in run.servers:
        for w in server.workloads:
            counted = ", ".join(str(c) for c in w.counted_prompt_tokens) or "n/a"
            lines.append(
                f"| {server.name} | {w.label} | {w.requests} | {w.failed} | {w.tokens_per_s:.1f} | "
                f"{_seconds(w.ttft_p50)} | {_seconds(w.ttft_p99)} | {_ms(w.itl_p50)} | {_ms(w.itl_p99)} | "
                f"{_mib(w.peak_rss)} | {'n/a' if w.preemptions is None else w.preemptions} | {counted} |"
            )
    return lines


def itl_table(run: ModelRun) -> list[str]:
    lines = [
        f"| server | quiet p50 / p99 | while a {ITL_PROMPT_TOKENS:,}-token prompt prefills p50 / p99 (max) "
        "| p99 ratio | the prompt answered in | refused stream requests | preemptions |",
        "|---|---|---|---|---|---|---|",
    ]
    for server in run.servers:
        if server.itl is None:
            continue
        level, pre = server.itl.level, server.itl.preemptions
        lines.append(
            f"| {server.name} | {level.baseline_p50_ms:.0f} / {level.baseline_p99_ms:.0f} ms | "
            f"{level.during_p50_ms:.0f} / {level.during_p99_ms:.0f} ms ({level.during_max_ms:.0f}) | "
            f"{level.p99_ratio:.2f}x | {level.long_prompt_s:.2f} s | {level.stream_errors} | "
            f"{'n/a' if pre is None else pre} |"
        )
    return lines


def _tok_s(result: WorkloadResult | None) -> str:
    if result is None:
        return "n/a"
    return f"{result.tokens_per_s:.1f}" + ("*" if result.failed else "")


def summary_table(run: ModelRun) -> list[str]:
    lines = [
        "| server (weights) | c=1 tok/s | c=8 tok/s | c=32 tok/s | TTFT p50 c=8 | TTFT p50 2,048 x 8 | TTFT 6,000 "
        "| ITL p99 ratio | peak RSS | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in run.servers:
        c8, long8, long1 = s.at("c8"), s.at("long-c8"), s.at("long-1")
        cells = [
            _tok_s(s.at("c1")),
            _tok_s(c8),
            _tok_s(s.at("c32")),
            _seconds(c8.ttft_p50) if c8 else "n/a",
            _seconds(long8.ttft_p50) if long8 else "n/a",
            _seconds(long1.ttft_p50) if long1 else "n/a",
            f"{s.itl.level.p99_ratio:.2f}x" if s.itl else "n/a",
            _mib(s.peak_rss),
            str(s.failed),
        ]
        lines.append(f"| {s.name} ({s.weights}) | " + " | ".join(cells) + " |")
    return lines


def _against_vllm(run: ModelRun, key: str) -> Target:
    text = f"{key}: tokenmill output tok/s >= {SPEED_OVER_VLLM}x vLLM's and TTFT p50 <= vLLM's"
    ours, theirs = run.server(TOKENMILL), run.server(VLLM)
    mine, vllm = (ours.at(key) if ours else None), (theirs.at(key) if theirs else None)
    if mine is None or vllm is None or vllm.tokens_per_s == 0:
        return Target(text, None, "tokenmill or vLLM not measured")
    ratio = mine.tokens_per_s / vllm.tokens_per_s
    met = ratio >= SPEED_OVER_VLLM and mine.ttft_p50 <= vllm.ttft_p50 and mine.failed == 0
    detail = f"{mine.tokens_per_s:.1f} vs {vllm.tokens_per_s:.1f} tok/s = {ratio:.2f}x; TTFT p50 "
    return Target(text, met, detail + f"{mine.ttft_p50:.3f} vs {vllm.ttft_p50:.3f} s")


def targets(run: ModelRun) -> list[Target]:
    """The targets, met or not (None: not evaluated, a server or a measurement missing)."""
    found = [_against_vllm(run, "c8"), _against_vllm(run, "c32")]
    ours, llama = run.server(TOKENMILL), run.server(LLAMA_BF16)
    text = "c1: tokenmill output tok/s >= llama-server BF16's"
    mine, theirs = (ours.at("c1") if ours else None), (llama.at("c1") if llama else None)
    if mine is None or theirs is None:
        found.append(Target(text, None, "tokenmill or llama-server BF16 not measured"))
    else:
        met = mine.tokens_per_s >= theirs.tokens_per_s and mine.failed == 0
        found.append(Target(text, met, f"{mine.tokens_per_s:.1f} vs {theirs.tokens_per_s:.1f} tok/s"))
    text = f"tokenmill ITL p99 while a {ITL_PROMPT_TOKENS:,}-token prompt prefills <= {ITL_RATIO_LIMIT:g}x quiet"
    if ours is None or ours.itl is None:
        found.append(Target(text, None, "not measured"))
    else:
        level = ours.itl.level
        detail = f"{level.during_p99_ms:.0f} vs {level.baseline_p99_ms:.0f} ms = {level.p99_ratio:.2f}x"
        found.append(Target(text, level.p99_ratio <= ITL_RATIO_LIMIT, detail))
    if ours is None or not ours.workloads:
        found.append(Target("tokenmill: no failed requests", None, "not measured"))
        found.append(Target(f"tokenmill peak RSS <= {RSS_OVER_BUDGET}x (weights + KV budget)", None, "not measured"))
        return found
    found.append(Target("tokenmill: no failed requests", ours.failed == 0 and not ours.note, f"{ours.failed} failed"))
    budget = run.weight_bytes + run.kv_bytes
    detail = f"{ours.peak_rss / GIB:.2f} GiB vs {budget / GIB:.2f} GiB = {ours.peak_rss / budget:.2f}x"
    rss_text = f"tokenmill peak RSS <= {RSS_OVER_BUDGET}x (weights + KV budget)"
    found.append(Target(rss_text, ours.peak_rss <= RSS_OVER_BUDGET * budget, detail))
    return found


def ratios(run: ModelRun) -> list[str]:
    """tokenmill against every other server, per workload: output tok/s and TTFT p50."""
    ours = run.server(TOKENMILL)
    if ours is None:
        return []
    lines = []
    for other in (s for s in run.servers if s.name != TOKENMILL):
        parts = []
        for mine in ours.workloads:
            theirs = other.at(mine.key)
            if theirs is None or theirs.tokens_per_s == 0 or theirs.ttft_p50 == 0:
                continue
            speed, ttft = mine.tokens_per_s / theirs.tokens_per_s, mine.ttft_p50 / theirs.ttft_p50
            parts.append(f"{mine.label}: {speed:.2f}x tok/s, {ttft:.2f}x TTFT p50")
        if parts:
            lines.append(f"tokenmill / {other.name}: " + "; ".join(parts))
    return lines


def markdown(run: ModelRun, runs: list[ModelRun], figure: Path | None) -> str:
    lines = [f"# tokenmill at {run.model} against vLLM CPU and llama-server", "", *run.conditions, "", "## Summary"]
    lines += ["", *summary_table(run), "", "`*`: failed requests or short replies; see below.", ""]
    lines += [f"## Targets (set for {TARGET_MODEL})", ""]
    lines += [f"- {t.line()}" for t in targets(run)]
    lines += ["", "## Ratios", "", *(f"- {r}" for r in ratios(run)), "", "## Every workload", ""]
    lines += [*workload_table(run), "", "## Inter-token latency while a long prompt prefills", ""]
    lines += [*itl_table(run), "", "## Cost growth across the models measured", ""]
    lines += [*cost_growth(runs), ""]
    lines += [f"![cost growth]({figure.name})", ""] if figure else []
    notes = [f"- {s.name}: {s.note}" for s in run.servers if s.note]
    lines += ["## Not measured", "", *notes, ""] if notes else []
    return "\n".join(lines)


GROWTH_COLUMNS = (  # (heading, workload key, what), in the cost-growth table
    ("tok/s c=1", "c1", "tokens_per_s"),
    ("tok/s c=8", "c8", "tokens_per_s"),
    ("tok/s c=32", "c32", "tokens_per_s"),
    ("TTFT p50 256 c=1", "c1", "ttft_p50"),
    ("TTFT p50 256 c=32", "c32", "ttft_p50"),
    ("TTFT p50 2,048 c=8", "long-c8", "ttft_p50"),
    ("TTFT 6,000", "long-1", "ttft_p50"),
)


def _growth_cells(server: ServerRun) -> list[float]:
    cells = []
    for _, key, what in GROWTH_COLUMNS:
        result = server.at(key)
        cells.append(float(getattr(result, what)) if result else math.nan)
    return [*cells, float(server.peak_rss) if server.peak_rss else math.nan]


def cost_growth(runs: list[ModelRun]) -> list[str]:
    """Every server's tokens/s, TTFT and peak RSS in each model measured, smallest model first, and each value's
    growth over the same server's in the smallest model (tok/s falling, TTFT and RSS rising with size)."""
    ordered = sorted(runs, key=lambda r: r.parameters)
    headings = [heading for heading, _, _ in GROWTH_COLUMNS] + ["peak RSS"]
    lines = [
        "| server | model | parameters | weights | " + " | ".join(headings) + " |",
        "|---|---|---|---|" + "---|" * len(headings),
    ]
    names = list(dict.fromkeys(s.name for r in ordered for s in r.servers))
    for name in names:
        first: list[float] | None = None
        for run in ordered:
            server = run.server(name)
            if server is None or not server.workloads:
                continue
            cells = _growth_cells(server)
            first = first or cells
            shown = []
            for value, base, index in zip(cells, first, range(len(cells)), strict=True):
                absolute = _absolute(value, index)
                grown = value / base if base and not math.isnan(base) and not math.isnan(value) else math.nan
                shown.append(absolute if cells is first or math.isnan(grown) else f"{absolute} ({grown:.2f}x)")
            lines.append(
                f"| {name} | {run.model} | {run.parameters / 1e9:.2f} B | {run.weight_bytes / GIB:.2f} GiB | "
                + " | ".join(shown)
                + " |"
            )
    return lines


def _absolute(value: float, index: int) -> str:
    if math.isnan(value):
        return "n/a"
    if index == len(GROWTH_COLUMNS):
        return f"{value / GIB:.2f} GiB"
    return f"{value:.1f}" if GROWTH_COLUMNS[index][2] == "tokens_per_s" else f"{value:.2f} s"


def preemptions(metrics: str) -> int | None:
    """The preemptions a Prometheus text exposition counts (tokenmill's or vLLM's counter, every label summed);
    None where it has no such counter."""
    total, found = 0.0, False
    for line in metrics.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        if name in PREEMPTION_COUNTERS:
            rest = line.rsplit("}", 1)[1] if "}" in line else line.split(None, 1)[1]
            total, found = total + float(rest.split()[0]), True
    return int(total) if found else None


def cost_figure(runs: list[ModelRun], path: Path) -> Path | None:
    """Tokens/s, TTFT and peak RSS against model size, one line per server (and level or prompt), as a PNG; None
    where matplotlib is missing (`pip install -e .[bench]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ordered = sorted(runs, key=lambda r: r.parameters)
    names = list(dict.fromkeys(s.name for r in ordered for s in r.servers))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    ttft = (GROWTH_COLUMNS[3], GROWTH_COLUMNS[5], GROWTH_COLUMNS[6])  # 256 c=1, 2,048 c=8, 6,000
    panels = [("output tok/s", GROWTH_COLUMNS[:3]), ("TTFT p50 (s, log)", ttft)]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    styles = ["-", "--", ":"]
    for ax, (ylabel, series) in zip(axes[:2], panels, strict=True):
        for name in names:
            for style, (label, key, what) in zip(styles, series, strict=True):
                points = [
                    (run.parameters / 1e9, float(getattr(result, what)))
                    for run in ordered
                    if (server := run.server(name)) and (result := server.at(key))
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker="o", color=colors[name], label=f"{name} {label}")
        ax.set_ylabel(ylabel)
    axes[1].set_yscale("log")
    for name in names:
        points = [
            (run.parameters / 1e9, server.peak_rss / GIB)
            for run in ordered
            if (server := run.server(name)) and server.peak_rss
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            axes[2].plot(xs, ys, marker="o", color=colors[name], label=name)
    weights = [(run.parameters / 1e9, run.weight_bytes / GIB) for run in ordered]
    axes[2].plot(*zip(*weights, strict=True), "k:", label="weights")
    axes[2].set_ylabel("peak RSS (GiB)")
    for ax, title in zip(axes, ["Throughput", "Time to first token", "Memory"], strict=True):
        ax.set_xlabel("parameters (billions)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

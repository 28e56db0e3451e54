"""Serving benchmark: tokenmill and the naive one-request-at-a-time server, one after the other, under the same
streaming load (`loadtests.load`), with the peak RSS of each server's process tree. Prints ratios and writes a
Markdown report.

    python -m loadtests.bench_server [--concurrency 1 8 32] [--max-tokens 128] [--skip-naive]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from loadtests.load import Report, run

REPO = Path(__file__).resolve().parent.parent


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its children, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass


def wait_ready(
    url: str, timeout: float = 600.0, path: str = "/ready", process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until GET `path` answers 200; fails at once if `process` (the server) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextlib.contextmanager
def tokenmill(port: int, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `tokenmill serve` on the default registry, ready; its URL and process. Stopped (drained) on exit."""
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, process
    finally:
        process.terminate()
        process.wait(60)


def measure(
    name: str, cmd: list[str], port: int, args: argparse.Namespace, per_client: int
) -> tuple[list[Report], int]:
    url = f"http://127.0.0.1:{port}"
    log = open(REPO / "loadtests" / "results" / f"{name}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        wait_ready(url)
        sampler = RssSampler(process.pid)
        sampler.start()
        print(f"--- {name}", flush=True)
        reports = run(url, args.model, args.concurrency, args.rate, per_client, args.max_tokens, {"ignore_eos": True})
        sampler.stopped.set()
        return reports, sampler.peak
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "server.md"))
    args = parser.parse_args()
    (REPO / "loadtests" / "results").mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]

    ours, ours_rss = measure(
        "tokenmill", [sys.executable, "-m", "app.cli", "serve", "--port", "8310"], 8310, args, args.requests_per_client
    )
    results = {"tokenmill": (ours, ours_rss)}
    if not args.skip_naive:
        naive_cmd = [sys.executable, "-m", "loadtests.naive_server", "--port", "8311"]
        results["naive"] = measure("naive", naive_cmd, 8311, args, 1)

    lines = [
        f"Load average before the run: {load_before:.2f}. {args.max_tokens} output tokens per request (ignore_eos).",
        "",
        "| server | load | tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | errors | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (reports, rss) in results.items():
        for r in reports:
            lines.append(
                f"| {name} | {r.label} | {r.tokens_per_s:.1f} | {r.requests_per_s:.2f} | {r.ttft_p50:.3f} s | "
                f"{r.ttft_p99:.3f} s | {r.itl_p50 * 1000:.1f} ms | {r.itl_p99 * 1000:.1f} ms | {r.e2e_p50:.2f} s | "
                f"{r.errors} | {rss / 2**20:.0f} MiB |"
            )
    if "naive" in results:
        lines.append("")
        for ours_r, base_r in zip(results["tokenmill"][0], results["naive"][0], strict=False):
            lines.append(
                f"- {ours_r.label}: tokenmill / naive = {ours_r.tokens_per_s / base_r.tokens_per_s:.1f}x tok/s"
            )
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

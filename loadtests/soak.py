"""Soak: a steady request rate for a long time, with random sizes and random disconnects, against a server this
script starts. Reports errors (other than the deliberate disconnects), each process's RSS at warm-up and at the end,
and p99 latency per minute.

    python -m loadtests.soak [--minutes 10] [--rate 2] [--disconnect 0.2] [--warmup 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

from loadtests.bench_server import tokenmill
from loadtests.load import PROMPTS, percentile

REPO = Path(__file__).resolve().parent.parent


def rss_by_process(pid: int) -> dict[str, float]:
    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        name = "worker" if "worker" in " ".join(proc.cmdline()) else "api"
        out[f"{name}[{proc.pid}]"] = proc.memory_info().rss / 2**20
    return out


async def one(client: httpx.AsyncClient, rng: random.Random, disconnect: float) -> tuple[str, float]:
    """('ok' | 'disconnected' | 'error: ...', latency)."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.choice([8, 32, 64, 128]),
        "temperature": rng.choice([0.0, 0.7]),
        "stream": True,
    }
    cut = rng.randint(1, 20) if rng.random() < disconnect else None
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return f"error: HTTP {response.status_code}", 0.0
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    if "error" in json.loads(line[6:]):
                        return f"error: {line[:120]}", 0.0
                    chunks += 1
                    if cut is not None and chunks >= cut:
                        return "disconnected", 0.0
        return "ok", time.perf_counter() - start
    except httpx.HTTPError as exc:
        return f"error: {exc!r}", 0.0


async def soak(url: str, minutes: float, rate: float, disconnect: float, pid: int, warmup: float) -> int:
    rng = random.Random(11)
    results: list[tuple[float, str, float]] = []
    warm: dict[str, float] = {}
    rss_per_minute: list[dict[str, float]] = []
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = []

        async def record(at: float) -> None:
            status, latency = await one(client, rng, disconnect)
            results.append((at, status, latency))

        while time.monotonic() - start < minutes * 60:
            elapsed = time.monotonic() - start
            if not warm and elapsed > warmup * 60:
                warm = rss_by_process(pid)
            if elapsed > 60 * (len(rss_per_minute) + 1):
                rss_per_minute.append(rss_by_process(pid))
            tasks.append(asyncio.create_task(record(elapsed)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    end = rss_by_process(pid)
    warm = warm or end
    per_minute: dict[int, list[float]] = defaultdict(list)
    for at, status, latency in results:
        if status == "ok":
            per_minute[int(at // 60)].append(latency)
    errors = [s for _, s, _ in results if s.startswith("error")]
    print(f"{len(results)} requests, {sum(1 for _, s, _ in results if s == 'disconnected')} disconnected on purpose")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    for minute, latencies in sorted(per_minute.items()):
        rss = rss_per_minute[minute] if minute < len(rss_per_minute) else end
        memory = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss.items())
        print(
            f"minute {minute + 1}: {len(latencies)} completed, p99 latency {percentile(latencies, 0.99):.2f} s; "
            f"RSS at its end: {memory}"
        )
    for name, before in warm.items():
        after = end.get(name, float("nan"))
        growth = (after / before - 1) * 100
        print(f"{name}: RSS {before:.0f} MiB after {warmup:g} min, {after:.0f} MiB at the end ({growth:+.1f}%)")
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of clients that hang up early")
    parser.add_argument("--port", type=int, default=8320)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes before the baseline RSS is taken")
    args = parser.parse_args()
    with tokenmill(args.port, "--max-waiting-requests", "1024") as (url, server):
        return asyncio.run(soak(url, args.minutes, args.rate, args.disconnect, server.pid, args.warmup))


if __name__ == "__main__":
    sys.exit(main())

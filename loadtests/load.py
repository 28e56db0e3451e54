"""A streaming load driver for any OpenAI-compatible server: output tokens/s, requests/s, TTFT, ITL and E2E latency
at a fixed concurrency or a fixed request rate. Every reply's token count is checked.

    python -m loadtests.load --url http://127.0.0.1:8000 --model smollm2 --concurrency 1 8 32 --max-tokens 128
    python -m loadtests.load --url ... --rate 2 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten ideas for a rainy Sunday afternoon, with one sentence each.",
    "Describe the water cycle in detail.",
    "What are the pros and cons of remote work? Answer in paragraphs.",
    "Write a poem about autumn leaves and the passage of time.",
    "Give step-by-step instructions for baking bread at home.",
    "Summarize the history of the printing press.",
]


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


@dataclass
class Report:
    label: str
    requests: int
    errors: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    e2e_p50: float
    e2e_p99: float
    bad_token_counts: int
    ttfts: list[float] = field(default_factory=list, repr=False)  # raw samples, seconds, for distribution plots
    itls: list[float] = field(default_factory=list, repr=False)
    first_error: str = ""

    def line(self) -> str:
        return (
            f"{self.label:>10}: {self.tokens_per_s:8.1f} tok/s {self.requests_per_s:6.2f} req/s  "
            f"TTFT p50 {self.ttft_p50:6.3f} p99 {self.ttft_p99:6.3f}  ITL p50 {self.itl_p50 * 1000:6.1f} "
            f"p99 {self.itl_p99 * 1000:6.1f} ms  E2E p50 {self.e2e_p50:6.2f} p99 {self.e2e_p99:6.2f}  "
            f"errors {self.errors}  short replies {self.bad_token_counts}"
            + (f"  first error: {self.first_error}" if self.first_error else "")
        )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(
    client: aiohttp.ClientSession, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]
) -> Sample:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra)
    for name in [k for k, v in extra.items() if v is None]:  # a peer that rejects a field OpenAI defines
        del body[name]
    start = time.perf_counter()
    last = start
    sample = Sample(ok=False)
    try:
        async with client.post("/v1/chat/completions", json=body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return sample
            async for raw in response.content:
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    sample.tokens = int(chunk["usage"]["completion_tokens"])
                if not any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if sample.ttft == 0.0:
                    sample.ttft = now - start
                else:
                    sample.itls.append(now - last)
                last = now
        sample.e2e = time.perf_counter() - start
        sample.ok = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = repr(exc)
    return sample


def summarize(label: str, samples: list[Sample], seconds: float, max_tokens: int) -> Report:
    good = [s for s in samples if s.ok]
    itls = [x for s in good for x in s.itls]
    tokens = sum(s.tokens for s in good)
    return Report(
        label=label,
        requests=len(samples),
        errors=len(samples) - len(good),
        seconds=seconds,
        output_tokens=tokens,
        tokens_per_s=tokens / seconds,
        requests_per_s=len(good) / seconds,
        ttft_p50=percentile([s.ttft for s in good], 0.5),
        ttft_p99=percentile([s.ttft for s in good], 0.99),
        itl_p50=percentile(itls, 0.5),
        itl_p99=percentile(itls, 0.99),
        e2e_p50=percentile([s.e2e for s in good], 0.5),
        e2e_p99=percentile([s.e2e for s in good], 0.99),
        bad_token_counts=sum(1 for s in good if s.tokens != max_tokens),
        ttfts=[s.ttft for s in good],
        itls=itls,
        first_error=next((s.error for s in samples if not s.ok), ""),
    )


def _session(url: str, connections: int) -> aiohttp.ClientSession:
    """aiohttp rather than httpx: the driver shares the server's cores, and per streamed chunk it costs a fraction of
    httpx's CPU time (its HTTP parser is in C). A connection per request: llama-server closes kept-alive connections
    after a stream, and aiohttp would send the next request down the closed one."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=True)  # limit 0: none
    return aiohttp.ClientSession(base_url=url, connector=connector, timeout=aiohttp.ClientTimeout(total=1800.0))


async def at_concurrency(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    extra: dict[str, Any],
    time_limit: float | None = None,
) -> Report:
    """`concurrency` clients, each sending its next request when its last one ends, until `requests` are done (or,
    given `time_limit`, until none is sent after that many seconds; requests under way then still finish)."""
    rng = random.Random(concurrency)
    queue = [rng.choice(PROMPTS) for _ in range(requests)]
    samples: list[Sample] = []
    async with _session(url, concurrency + 4) as client:

        async def worker() -> None:
            while queue and (time_limit is None or time.perf_counter() - start < time_limit):
                samples.append(await one_request(client, model, queue.pop(), max_tokens, extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return summarize(f"c={concurrency}", samples, seconds, max_tokens)


async def at_rate(url: str, model: str, rate: float, requests: int, max_tokens: int, extra: dict[str, Any]) -> Report:
    """Poisson arrivals at `rate` requests/s (fixed seed), whatever the server's pace."""
    rng = random.Random(7)
    async with _session(url, 0) as client:
        tasks = []
        start = time.perf_counter()
        for _ in range(requests):
            tasks.append(asyncio.create_task(one_request(client, model, rng.choice(PROMPTS), max_tokens, extra)))
            await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    return summarize(f"rate={rate:g}", list(samples), seconds, max_tokens)


def run(
    url: str,
    model: str,
    concurrencies: list[int],
    rate: float | None,
    requests_per_client: int,
    max_tokens: int,
    extra: dict[str, Any],
    time_limit: float | None = None,
) -> list[Report]:
    reports = []
    for concurrency in concurrencies:
        requests = max(concurrency * requests_per_client, 4)
        report = asyncio.run(at_concurrency(url, model, concurrency, requests, max_tokens, extra, time_limit))
        print(report.line(), flush=True)
        reports.append(report)
    if rate is not None:
        report = asyncio.run(at_rate(url, model, rate, max(8, int(rate * 30)), max_tokens, extra))
        print(report.line(), flush=True)
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rate", type=float, default=None, help="also run Poisson arrivals at this many req/s")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-ignore-eos", action="store_true", help="let replies end early (peers without it)")
    parser.add_argument("--out", default=None, help="write the reports as JSON here")
    args = parser.parse_args(argv)
    extra = {} if args.no_ignore_eos else {"ignore_eos": True}
    reports = run(args.url, args.model, args.concurrency, args.rate, args.requests_per_client, args.max_tokens, extra)
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=2)
    return 0 if all(r.errors == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

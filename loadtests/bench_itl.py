"""Do streams keep flowing while a long prompt prefills? N streams decode on a live server; over a quiet window their
inter-token gaps are the baseline; then one long prompt (random token ids, one output token) arrives and the gaps
that overlap its prefill (ending after it was sent, beginning before it was answered) are measured against that
baseline. One line per prompt length, each with its own baseline, and the long prompt's time to its answer.

    python -m loadtests.bench_itl [--streams 8] [--prompt-tokens 1024 4096] [--window 5] [--url URL | -- SERVE FLAGS]

Without --url it starts `tokenmill serve` on the default registry (flags after `--` go to it) and stops it after.
Any server with /v1/completions, ignore_eos and token-id prompts can be measured (`measure`: vLLM, llama-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.bench_server import tokenmill
from loadtests.load import percentile


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"
    streams: int = 8
    stream_tokens: int = 300  # each stream's max_tokens before it restarts
    prompt_tokens: tuple[int, ...] = (1024, 4096)
    warmup: float = 3.0  # seconds of decoding before the first window
    window: float = 5.0  # seconds of the quiet baseline before each prompt
    seed: int = 0  # of the long prompts' ids: another one misses the cache


def token_arrived(chunk: dict[str, Any]) -> bool:
    """Whether a streamed completion chunk carries a token: text, or its logprobs (the text of a token the
    detokenizer holds back is empty; servers that send logprobs still send its chunk, llama-server sends none)."""
    choices = chunk.get("choices") or [{}]
    logprobs = choices[0].get("logprobs") or {}
    return bool(choices[0].get("text") or logprobs.get("tokens") or logprobs.get("content"))


@dataclass
class Level:
    prompt_tokens: int
    baseline_gaps: int
    baseline_p50_ms: float
    baseline_p99_ms: float
    during_gaps: int
    during_p50_ms: float
    during_p99_ms: float
    during_max_ms: float
    long_prompt_s: float
    stream_errors: int = 0  # the streams' refused requests until the long prompt was answered

    @property
    def p99_ratio(self) -> float:
        return self.during_p99_ms / self.baseline_p99_ms


def overlapping(gaps: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Of (arrival, gap) pairs, the gaps that end after `start` and begin before `end`: also those a prompt held up
    until it was done (a server that prefills a whole prompt in one step sends the streams nothing meanwhile)."""
    return [gap for arrival, gap in gaps if arrival >= start and arrival - gap <= end]


class Streams:
    """Clients that each keep one stream decoding, restarting it when it ends; every token's arrival is kept."""

    def __init__(self, session: aiohttp.ClientSession, model: str, count: int, max_tokens: int) -> None:
        self.session, self.model, self.max_tokens = session, model, max_tokens
        self.gaps: list[tuple[float, float]] = []  # (arrival, seconds since the stream's previous token)
        self.errors: list[str] = []
        self.tasks = [asyncio.create_task(self._client(i)) for i in range(count)]

    async def _client(self, index: int) -> None:
        prompt = f"Client {index}: write a very long story about a lighthouse keeper."
        while True:
            body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "stream": True}
            # logprobs: a chunk for every token, also one whose text the detokenizer holds back (random weights
            # write broken UTF-8), so each gap is one step's
            body |= {"temperature": 0.0, "ignore_eos": True, "logprobs": 0}
            last: float | None = None
            async with self.session.post("/v1/completions", json=body) as response:
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}")
                    await asyncio.sleep(0.5)
                    continue
                async for raw in response.content:
                    if not raw.startswith(b"data: {") or not token_arrived(json.loads(raw[6:])):
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        self.gaps.append((now, now - last))
                    last = now

    def between(self, start: float, end: float) -> list[float]:
        return [gap for arrival, gap in self.gaps if start <= arrival <= end]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def long_prompt(session: aiohttp.ClientSession, model: str, tokens: int, seed: int) -> float:
    rng = random.Random(seed)  # ids from the middle of the vocabulary of any model measured here
    body: dict[str, Any] = {"model": model, "prompt": [rng.randrange(1000, 30000) for _ in range(tokens)]}
    body |= {"max_tokens": 1, "temperature": 0.0}
    start = time.perf_counter()
    async with session.post("/v1/completions", json=body) as response:
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"the {tokens}-token prompt got HTTP {response.status}: {text[:300]}")
    return time.perf_counter() - start


async def measure(url: str, settings: Settings) -> list[Level]:
    """The server at `url` measured at each of `settings.prompt_tokens`, a line printed for each."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:
        streams = Streams(session, settings.model, settings.streams, settings.stream_tokens)
        await asyncio.sleep(settings.warmup)
        levels = []
        try:
            for index, tokens in enumerate(settings.prompt_tokens):
                quiet_start = time.perf_counter()
                await asyncio.sleep(settings.window)
                baseline = streams.between(quiet_start, time.perf_counter())
                sent = time.perf_counter()
                seconds = await long_prompt(session, settings.model, tokens, seed=settings.seed + index)
                if not baseline:
                    raise RuntimeError(f"no stream tokens measured (errors: {streams.errors[:3]})")
                await asyncio.sleep(max(0.5, 3 * percentile(baseline, 0.99)))  # the gaps it held up end
                during = overlapping(streams.gaps, sent, sent + seconds)
                if not during:
                    raise RuntimeError(f"no stream tokens after the long prompt (errors: {streams.errors[:3]})")
                levels.append(
                    Level(
                        tokens,
                        len(baseline),
                        1000 * percentile(baseline, 0.5),
                        1000 * percentile(baseline, 0.99),
                        len(during),
                        1000 * percentile(during, 0.5),
                        1000 * percentile(during, 0.99),
                        1000 * max(during),
                        seconds,
                        len(streams.errors),
                    )
                )
                print(line(levels[-1]), flush=True)
        finally:
            await streams.stop()
        return levels


def line(level: Level) -> str:
    return (
        f"| {level.prompt_tokens} | {level.baseline_p50_ms:.0f} / {level.baseline_p99_ms:.0f} ms | "
        f"{level.during_p50_ms:.0f} / {level.during_p99_ms:.0f} ms (max {level.during_max_ms:.0f}) | "
        f"{level.p99_ratio:.2f}x | {level.long_prompt_s:.2f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start tokenmill serve)")
    parser.add_argument("--port", type=int, default=8320)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=300, help="each stream's max_tokens before it restarts")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of decoding before the first window")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of the quiet baseline before each prompt")
    parser.add_argument("--seed", type=int, default=0, help="of the long prompts' ids: another one misses the cache")
    parser.add_argument("--out", default=None, help="also write the levels as JSON here")
    parser.add_argument("serve_flags", nargs="*", help="after --: flags for tokenmill serve")
    args = parser.parse_args(argv)
    settings = Settings(
        args.model, args.streams, args.stream_tokens, tuple(args.prompt_tokens), args.warmup, args.window, args.seed
    )
    print(f"{args.streams} streams; gaps between tokens, p50 / p99, quiet and while the prompt prefills")
    print("| prompt tokens | quiet | while it prefills | p99 ratio | its answer |\n|---|---|---|---|---|")
    if args.url:
        levels = asyncio.run(measure(args.url, settings))
    else:
        with tokenmill(args.port, *args.serve_flags) as (url, _):
            levels = asyncio.run(measure(url, settings))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(level) for level in levels], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

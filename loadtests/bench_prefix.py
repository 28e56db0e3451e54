"""Prefix reuse: time to first token of requests whose ~1,000-token system prompt is in the prefix cache, against
requests whose system prompt is new, one request at a time on the default model. Reports both medians, their ratio
(the target is <= 0.2) and the cached prompt tokens the server reported.

    python -m loadtests.bench_prefix [--requests 8] [--port 8330]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

from loadtests.bench_server import tokenmill
from loadtests.comparison import PrefixReuse

REPO = Path(__file__).resolve().parent.parent
PARAGRAPH = (
    "You are the support assistant of a bicycle shop. Customers ask about repairs, prices, opening hours, rentals "
    "and the parts we stock. Answer briefly and politely, in the customer's language, and never invent prices. "
)
QUESTIONS = ["Are you open on Sunday?", "How much is a new chain?", "Can I rent a bike for a day?", "Do you fix "
             "e-bikes?", "Where are you?", "Do you sell helmets?", "How long does a repair take?", "Hi!"]  # fmt: skip


def first_token(client: httpx.Client, system: str, question: str, model: str) -> tuple[float, int, int]:
    """(TTFT in seconds, prompt tokens, cached prompt tokens) of one streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, prompt, cached = 0.0, 0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not ttft and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                prompt = chunk["usage"]["prompt_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ttft, prompt, cached


def measure(url: str, model: str = "smollm2", requests: int = 8) -> PrefixReuse:
    """Misses (a new system prompt each) one at a time, then hits (the shared one, cached by a first request)."""
    shared = PARAGRAPH * 22
    with httpx.Client(base_url=url, timeout=300) as client:
        first_token(client, "warm-up " + shared, "hi", model)  # the first request pays one-off costs
        misses = [first_token(client, f"{uuid.uuid4().hex} {shared}", q, model) for q in QUESTIONS[:requests]]
        first_token(client, shared, "hello", model)  # puts the shared system prompt in the cache
        hits = [first_token(client, shared, q, model) for q in QUESTIONS[:requests]]
    return PrefixReuse(
        miss_ttft=statistics.median(t for t, _, _ in misses),
        hit_ttft=statistics.median(t for t, _, _ in hits),
        prompt_tokens=int(statistics.median(p for _, p, _ in hits)),
        miss_cached=[c for _, _, c in misses],
        hit_cached=[c for _, _, c in hits],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--port", type=int, default=8330)
    args = parser.parse_args()
    with tokenmill(args.port, "--kv-cache-memory", "256MiB") as (url, _):
        print("\n".join(measure(url, requests=args.requests).lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

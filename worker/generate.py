"""Offline generation without HTTP: load a registry entry, run the engine in-process, print completions.

`python -m worker.generate --prompt "..."` (or `tokenmill generate`) serves as the quickest check that a model works.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from worker.messages import InvalidRequest, SamplingParams
from worker.registry import DEFAULT_REGISTRY, RegistryError, load_registry


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m worker.generate", description=__doc__)
    parser.add_argument(
        "--models", default=str(DEFAULT_REGISTRY), help="the models.yaml registry (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="the entry's name (default: the registry's first model)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several (batched)")
    parser.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and engine details")
    return parser


def run(args: argparse.Namespace) -> int:
    from worker.engine import Engine  # torch loads here, not when the CLI parses its arguments
    from worker.loader import load_model
    from worker.runtime import configure_threads

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        registry = load_registry(args.models)
        entry = registry.get(args.model) if args.model else registry.models[0]
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyError:
        names = ", ".join(e.name for e in registry.models)
        print(f"no model named '{args.model}' in {args.models}; it has: {names}", file=sys.stderr)
        return 2
    configure_threads(entry.threads)
    loaded = load_model(entry, Path(args.cache_dir) if args.cache_dir else None)
    engine = Engine.from_loaded(loaded, entry)
    tokenizer = loaded.tokenizer
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        for index, prompt in enumerate(args.prompt):
            if args.raw:
                ids = list(tokenizer(prompt)["input_ids"])
            else:
                messages = [{"role": "user", "content": prompt}]
                ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
            engine.add_request(str(index), [int(t) for t in ids], params)
    except InvalidRequest as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return 2
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(args.prompt))}
    start = time.perf_counter()
    while engine.has_work():
        for out in engine.step().outputs:
            tokens[out.request_id].extend(out.new_token_ids)
    elapsed = time.perf_counter() - start
    for index, prompt in enumerate(args.prompt):
        text = tokenizer.decode(tokens[str(index)], skip_special_tokens=True)
        print(f"### {prompt}\n{text}\n")
    total = sum(len(t) for t in tokens.values())
    print(f"[{entry.name}: {total} tokens in {elapsed:.2f} s, {total / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

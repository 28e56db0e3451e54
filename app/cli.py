"""The `tokenmill` command. Subcommands import the worker lazily, so the API process never loads torch."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description="An OpenAI-compatible LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="generate offline (no HTTP) with a model from the registry")
    from worker.generate import build_parser

    build_parser(generate)
    args = parser.parse_args(argv)
    if args.command == "generate":
        from worker.generate import run

        return run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

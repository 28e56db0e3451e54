"""Test-only fault injection for the worker process, so reliability tests can make a real step fail.

`TOKENMILL_TEST_FAULT=raise:ID` fails every step that runs a request whose prompt holds token id ID; `oom:ID`
raises torch's out-of-memory error instead; `slow:MS` makes every step MS milliseconds longer, so that a stream
outlasts what a test does meanwhile however fast the engine is. Read once at worker start; unset in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

ENV = "TOKENMILL_TEST_FAULT"


def fault_hook(spec: str) -> Callable[[list[list[int]]], None]:
    kind, _, tag = spec.partition(":")
    if kind not in ("raise", "oom", "slow") or not tag.isdigit():
        raise ValueError(f"{ENV} must be 'raise:TOKEN_ID', 'oom:TOKEN_ID' or 'slow:MILLISECONDS', got {spec!r}")
    if kind == "slow":
        delay = int(tag) / 1000

        def slow(prompts: list[list[int]]) -> None:
            time.sleep(delay)

        return slow
    token = int(tag)

    def hook(prompts: list[list[int]]) -> None:
        if any(token in prompt for prompt in prompts):
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory (token {token})")
            raise RuntimeError(f"injected fault (token {token})")

    return hook

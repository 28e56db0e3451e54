"""Test-only fault injection for the worker process, so reliability tests can make a real step fail, crawl or hang.

`TOKENMILL_TEST_FAULT` holds one fault or several separated by commas. `raise:ID` fails every step that runs a
request whose prompt holds token id ID; `oom:ID` raises torch's out-of-memory error instead; `slow:MS` makes every
step MS milliseconds longer, so that a stream outlasts what a test does meanwhile however fast the engine is;
`busy:ID:MS` makes such a step compute (burn CPU, as a long forward does) for MS milliseconds; `hang:ID` blocks
such a step forever on a lock, using no CPU, as a deadlock does. Read once at worker start; unset in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

ENV = "TOKENMILL_TEST_FAULT"
_ARGS = {"raise": 1, "oom": 1, "slow": 1, "busy": 2, "hang": 1}
_FORMS = "'raise:TOKEN_ID', 'oom:TOKEN_ID', 'slow:MILLISECONDS', 'busy:TOKEN_ID:MILLISECONDS' or 'hang:TOKEN_ID'"

Hook = Callable[[list[list[int]]], None]


def fault_hook(spec: str) -> Hook:
    hooks = [_parse(part) for part in spec.split(",")]
    if len(hooks) == 1:
        return hooks[0]

    def every(prompts: list[list[int]]) -> None:
        for hook in hooks:
            hook(prompts)

    return every


def _parse(spec: str) -> Hook:
    kind, *args = spec.split(":")
    if len(args) != _ARGS.get(kind) or not all(arg.isdigit() for arg in args):
        raise ValueError(f"{ENV} must be {_FORMS}, or several separated by commas; got {spec!r}")
    if kind == "slow":
        delay = int(args[0]) / 1000
        return lambda prompts: time.sleep(delay)
    token = int(args[0])

    def hook(prompts: list[list[int]]) -> None:
        if not any(token in prompt for prompt in prompts):
            return
        if kind == "busy":
            _compute(int(args[1]) / 1000)
        elif kind == "hang":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # never returns: the main loop is stuck, while the process's other threads go on
        elif kind == "oom":
            raise torch.OutOfMemoryError(f"injected out-of-memory (token {token})")
        else:
            raise RuntimeError(f"injected fault (token {token})")

    return hook


def _compute(seconds: float) -> None:
    """Keeps a core busy in Python, holding the GIL between switch intervals: a harder case for the heartbeat thread
    than a torch forward, which releases the GIL while its kernels run."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(10_000))

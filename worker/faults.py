"""Test-only fault injection for the worker process, so reliability tests can make a real step fail.

`TOKENMILL_TEST_FAULT=raise:TAG` fails every step that runs a request whose id contains TAG; `oom:TAG` raises
torch's out-of-memory error instead. Read once at worker start; unset in production.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ENV = "TOKENMILL_TEST_FAULT"


def fault_hook(spec: str) -> Callable[[list[str]], None]:
    kind, _, tag = spec.partition(":")
    if kind not in ("raise", "oom") or not tag:
        raise ValueError(f"{ENV} must be 'raise:TAG' or 'oom:TAG', got {spec!r}")

    def hook(request_ids: list[str]) -> None:
        if any(tag in request_id for request_id in request_ids):
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory ({tag})")
            raise RuntimeError(f"injected fault ({tag})")

    return hook

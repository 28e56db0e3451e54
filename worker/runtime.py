"""Process-wide runtime settings of a worker: torch threads. One thread per free core unless configured."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tokenmill.runtime")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_threads(threads: int | None) -> int:
    import torch

    count = threads or default_threads()
    torch.set_num_threads(count)
    log.info("torch threads: %d", count)
    return count

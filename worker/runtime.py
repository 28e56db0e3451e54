"""Process-wide runtime settings of a worker: torch threads.

Default: one thread per core left free by the API process, i.e. all usable cores but one (at least one). OpenMP
threads that outnumber the free cores collapse: each parallel region waits for a descheduled thread, and a step
that takes 70 ms with one thread was measured at 2.3 s with two while another process kept one of two cores busy.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tokenmill.runtime")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    return max(1, usable_cores() - 1)


def configure_threads(threads: int | None) -> int:
    import torch

    count = threads or default_threads()
    torch.set_num_threads(count)
    log.info("torch threads: %d of %d usable cores", count, usable_cores())
    return count

"""Process-wide runtime settings of a worker: torch threads, and handing freed heap memory back to the OS.

Default: one thread per core left free by the API process, i.e. all usable cores but one (at least one). OpenMP
threads that outnumber the free cores collapse: each parallel region waits for a descheduled thread, and a step
that takes 70 ms with one thread was measured at 2.3 s with two while another process kept one of two cores busy.
Sleeping waiters (OMP_WAIT_POLICY=PASSIVE) avoid the collapse but gained nothing either on that 2-core machine:
SmolLM2 batch 32 took 90 ms a step on one thread and 90-94 ms on two, and batch 1 got slower (52 -> 51-73 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

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


class HeapTrimmer:
    """Returns freed heap pages to the OS now and then (glibc's malloc_trim). Batches of varying shapes leave holes
    in malloc's arenas that RSS keeps counting; a 10-minute soak grew the worker by 4.5% without this. No-op where
    the C library has no malloc_trim."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._last = time.monotonic()
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)

    def maybe_trim(self) -> None:
        if time.monotonic() - self._last >= self.every:
            self.trim()

    def trim(self) -> None:
        self._last = time.monotonic()
        if self._trim is not None:
            self._trim(0)

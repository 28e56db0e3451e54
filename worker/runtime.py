"""Process-wide runtime settings of a worker: torch threads, and handing freed heap memory back to the OS.

Threads. OpenMP threads that outnumber the free cores collapse: each parallel region waits for a descheduled
thread, and a step that takes 70 ms with one thread was measured at 2.3 s with two while another process kept one of
two cores busy. But one thread leaves half of a 2-core machine idle: on long prompts a step computes, and two threads
prefilled 1.5-2x faster there, with the API process and a load driver on the same cores. So by default
(`threads` unset) a `ThreadGovernor` measures, twice a second, how much CPU other processes take from the cores this
one may use, and runs on every usable core while they are free, one fewer for each core the others keep busy.
`threads: N` pins the count instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

import psutil

log = logging.getLogger("tokenmill.runtime")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """All usable cores but one: the count for a process that shares the machine with busy neighbours (tests)."""
    return max(1, usable_cores() - 1)


def configure_threads(threads: int | None) -> int:
    import torch

    count = threads or usable_cores()
    torch.set_num_threads(count)
    log.info("torch threads: %d of %d usable cores%s", count, usable_cores(), "" if threads else " (adaptive)")
    return count


# A thread is given up for each this much of a core that other processes keep busy: a neighbour at half a core
# (the API process streaming to 32 clients) still leaves room for both threads.
CORE_PER_THREAD = 0.75


class ThreadGovernor:
    """Sets torch's thread count from the cores other processes leave free, measured from the kernel's CPU counters
    over the last `every` seconds; a new count is taken only when two readings in a row ask for it."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.max_threads = usable_cores()
        self.threads = self.max_threads
        self._process = psutil.Process()
        self._wanted = self.threads
        self._last = self._reading()

    def _reading(self) -> tuple[float, float, float]:
        """(now, CPU seconds busy on the usable cores, CPU seconds of this process)."""
        per_cpu = psutil.cpu_times(percpu=True)
        cores = [per_cpu[i] for i in self.cores if i < len(per_cpu)] or per_cpu
        busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in cores)
        own = self._process.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def others(self, reading: tuple[float, float, float]) -> float:
        """Cores that other processes kept busy since the last reading."""
        (then, busy_then, own_then), (now, busy, own) = self._last, reading
        return max(0.0, (busy - busy_then) - (own - own_then)) / max(now - then, 1e-6)

    def want(self, others: float) -> int:
        return max(1, self.max_threads - int(others / CORE_PER_THREAD))

    def adjust(self) -> int:
        """Call before each step; reads the counters at most every `every` seconds. Returns the thread count."""
        if time.monotonic() - self._last[0] < self.every:
            return self.threads
        reading = self._reading()
        others = self.others(reading)
        self._last = reading
        return self.update(others)

    def update(self, others: float) -> int:
        """Fold in one reading of the cores others keep busy; returns the thread count."""
        wanted = self.want(others)
        if wanted != self.threads and wanted == self._wanted:
            import torch

            log.info("torch threads: %d -> %d (other processes keep cores busy)", self.threads, wanted)
            torch.set_num_threads(wanted)
            self.threads = wanted
        self._wanted = wanted
        return self.threads


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

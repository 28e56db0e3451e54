"""`Liveness`: tells a worker that is slow from one that is stuck, from the frames it sends.

Wall time between steps cannot tell them apart: one prefill of a long prompt on a large model may take a minute.
So the worker also sends a `Heartbeat` from a thread of its own every `watchdog / 4` seconds, carrying the CPU time
its process has used. Progress is either a finished step, or a heartbeat interval in which the process used at
least `MIN_CPU_SHARE` of a core (measured on the worker's clock, so delivery jitter does not count):

- a long step computes: the forward's threads burn CPU, and so does a host thread waiting for CUDA kernels (CUDA
  spin-waits by default; on an H200, `synchronize()`, `.item()` and `.tolist()` behind 3 s of matmuls each used a
  full core), so every interval counts as progress, however long the step;
- a deadlocked loop (waiting on a lock or a queue forever) burns almost none; the heartbeat thread's own cost is a
  few microseconds a beat, far below the threshold;
- a stopped (SIGSTOP) or frozen process sends no heartbeats at all.

Progress from a heartbeat is credited to the start of its interval, so a worker that stops progressing is judged
stuck `watchdog` seconds after it stopped (plus the supervisor's check period), never later. What this cannot catch
is a step spinning forever in a loop that computes: that looks like a long forward, and only a step deadline could
tell them apart.
"""

from __future__ import annotations

from worker.messages import Heartbeat

# Of one core, over one heartbeat interval: far above an idle worker's (its tests see under 0.05), far below a step
# starved of CPU by its neighbours (a busy step on a crowded 2-core test machine got 0.5).
MIN_CPU_SHARE = 0.1


class Liveness:
    def __init__(self) -> None:
        self.last_progress = 0.0  # the API process's monotonic clock
        self._beat: Heartbeat | None = None
        self._beat_time = 0.0  # when it arrived
        self._cpu_share = 0.0  # over the last interval

    def reset(self, now: float) -> None:
        """A new worker process: nothing to compare its first heartbeat with."""
        self.last_progress = now
        self._beat = None
        self._beat_time = now

    def work_arrived(self, now: float) -> None:
        """Work for an idle worker: the time it had nothing to do is no stall."""
        self.last_progress = now

    def stepped(self, now: float) -> None:
        self.last_progress = now

    def heartbeat(self, now: float, beat: Heartbeat) -> None:
        previous, self._beat, self._beat_time = self._beat, beat, now
        if previous is None:
            return
        interval = beat.monotonic - previous.monotonic
        if interval <= 0:
            return
        self._cpu_share = (beat.cpu_seconds - previous.cpu_seconds) / interval
        if self._cpu_share >= MIN_CPU_SHARE:
            self.last_progress = max(self.last_progress, now - interval)

    def stalled(self, now: float) -> float:
        """Seconds since the last evidence of progress."""
        return now - self.last_progress

    def describe(self, now: float) -> str:
        """What the last heartbeat said, for the log line of a kill."""
        beat = self._beat
        if beat is None:
            return "no heartbeat since it started"
        where = f"in step {beat.step + 1} for {beat.step_seconds:.1f} s" if beat.step_seconds else "between steps"
        return f"last heartbeat {now - self._beat_time:.1f} s ago, {where}, using {self._cpu_share:.2f} of a core"

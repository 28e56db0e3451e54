"""`Liveness` on chosen heartbeats: CPU use is progress, credited to the start of its interval; silence and idle
beats are not."""

from __future__ import annotations

from app.liveness import MIN_CPU_SHARE, Liveness
from worker.messages import Heartbeat


def beat(at: float, cpu: float, step: int = 3, running: float = 0.0) -> Heartbeat:
    return Heartbeat(monotonic=at, cpu_seconds=cpu, step=step, step_seconds=running)


def test_computing_beats_are_progress_from_the_start_of_their_interval() -> None:
    live = Liveness()
    live.reset(100.0)
    live.heartbeat(100.5, beat(10.0, 5.0))  # the first beat only sets the baseline
    assert live.stalled(101.0) == 1.0
    live.heartbeat(101.5, beat(11.0, 5.5, running=1.0))  # half a core over the last second
    assert live.stalled(101.5) == 1.0  # credited to 100.5, where that second began
    assert "in step 4 for 1.0 s, using 0.50 of a core" in live.describe(101.5)


def test_beats_without_cpu_are_no_progress() -> None:
    live = Liveness()
    live.reset(0.0)
    cpu = 1.0
    for i in range(1, 9):
        cpu += 0.5 * MIN_CPU_SHARE * 0.5  # half the threshold over each half-second interval
        live.heartbeat(i * 0.5, beat(i * 0.5, cpu, running=i * 0.5))
    assert live.stalled(4.0) == 4.0


def test_silence_is_no_progress_and_steps_are() -> None:
    live = Liveness()
    live.reset(0.0)
    assert live.stalled(7.0) == 7.0
    assert live.describe(7.0) == "no heartbeat since it started"
    live.stepped(7.0)
    assert live.stalled(8.0) == 1.0
    live.work_arrived(9.0)
    assert live.stalled(9.5) == 0.5


def test_a_new_worker_is_not_compared_with_the_old_one() -> None:
    live = Liveness()
    live.reset(0.0)
    live.heartbeat(1.0, beat(2.0, 1.0))
    live.reset(10.0)  # restarted: its clock and CPU time start over, and would look like a core's work since
    live.heartbeat(11.0, beat(3.0, 2.0))
    assert live.stalled(12.0) == 2.0

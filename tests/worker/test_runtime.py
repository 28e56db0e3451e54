"""Worker threads: every usable core by default, and the governor gives cores up to other processes that keep them
busy (measured with a real busy process), then takes them back."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from worker.runtime import CORE_PER_THREAD, ThreadGovernor, configure_threads, usable_cores


def test_unset_threads_take_every_usable_core_and_a_number_pins_them() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(None) == usable_cores() == torch.get_num_threads()
        assert configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_a_thread_is_given_up_for_each_core_others_keep_busy() -> None:
    governor = ThreadGovernor()
    governor.max_threads = 4
    assert [governor.want(others) for others in (0.0, 0.5, 0.74, 0.8, 1.6, 3.9, 8.0)] == [4, 4, 4, 3, 2, 1, 1]
    assert governor.want(CORE_PER_THREAD) == 3


def test_a_new_count_needs_two_readings_in_a_row() -> None:
    before = torch.get_num_threads()
    governor = ThreadGovernor()
    governor.max_threads = governor.threads = 2
    try:
        assert [governor.update(others) for others in (1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0)] == [2, 2, 2, 1, 1, 1, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(usable_cores() < 2, reason="one usable core: there is no thread to give up")
def test_the_governor_yields_to_a_busy_process() -> None:
    """A real neighbour spinning on a core: the governor sees it through the kernel's counters and gives one up."""
    before = torch.get_num_threads()
    governor = ThreadGovernor(every=0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while governor.adjust() == governor.max_threads and time.monotonic() < deadline:
            time.sleep(0.35)
        assert governor.threads == torch.get_num_threads() < governor.max_threads
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(before)

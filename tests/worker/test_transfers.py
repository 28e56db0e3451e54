"""Host-to-device copies: lists come back as one tensor each, in order, of the asked dtype, on the device."""

from __future__ import annotations

import pytest
import torch

from worker.transfers import lists_to_device, to_device

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_lists_come_back_split_in_order(device: str) -> None:
    ids, empty, slots = lists_to_device([[5, 6, 7], [], [40, 41]], torch.int32, torch.device(device))
    assert [t.tolist() for t in (ids, empty, slots)] == [[5, 6, 7], [], [40, 41]]
    assert {t.dtype for t in (ids, empty, slots)} == {torch.int32}
    assert {t.device.type for t in (ids, empty, slots)} == {device}


@pytest.mark.parametrize("device", DEVICES)
def test_a_host_tensor_arrives_unchanged(device: str) -> None:
    host = torch.randn(3, 5)
    assert torch.equal(to_device(host, torch.device(device)).cpu(), host)

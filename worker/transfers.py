"""Host-to-device copies that do not make the host wait.

A copy to CUDA from pageable memory first waits for all the work queued on the device; from pinned memory it is
queued like a kernel, and the host goes on. On the CPU these are plain tensors.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory, without blocking."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def lists_to_device(lists: list[list[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One tensor per list on `device`, all in one copy (views of one packed tensor)."""
    packed = torch.tensor([value for values in lists for value in values], dtype=dtype)
    return list(torch.split(to_device(packed, device), [len(values) for values in lists]))

"""Copies between the host and the device that do not wait for the device.

With the overlap schedule the host prepares a step while the step before still runs on the GPU. A
blocking host-to-device copy, or one from pageable memory (which the driver may serialize with the
stream), would wait for that step; a copy from pinned memory is queued behind it instead. A pinned
block goes back to torch's host cache, which reuses it only once the copy has run, so the source
may be dropped at once. On the CPU both functions are plain copies (or none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: torch.Tensor | Sequence, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a host tensor, or values made into one of `dtype`) on `device`, queued without waiting."""
    cuda = device.type == "cuda"
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype, pin_memory=cuda)
    if not cuda:
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`, started without waiting (valid once the work queued before it has run)."""
    if not t.is_cuda:
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

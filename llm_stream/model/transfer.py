"""Host values to the device without making the host wait for the device.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory,
which waits for the device to finish all queued work first: every such copy
inside a step would stall the pipeline that lets the host prepare step N+1
while the device computes step N. Staging through pinned memory makes the copy
asynchronous; torch's pinned-memory cache keeps the staging buffer alive until
the copy is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Transfer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"

    def host(self, values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to copy from (pinned where the device is a GPU)."""
        return torch.tensor(values, dtype=dtype, pin_memory=self._pinned)

    def to_device(
        self, values: Sequence[float] | Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """``values`` as a device tensor, copied without waiting."""
        return self.host(values, dtype).to(self.device, non_blocking=True)

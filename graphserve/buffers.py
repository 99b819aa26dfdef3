"""Persistent per-step input buffers: one device tensor and the host copies it is uploaded from.

Each step writes its inputs into the host copy (numpy views, so the writers are plain numpy) and uploads the
prefix it uses with one copy. On a GPU there are two host copies, pinned where the platform pins, used in turn:
with async scheduling step N+1 is staged while step N's upload may still be queued behind step N-1, and by then
only step N-1's staging set is known to be free. The device tensor keeps its address for the whole run, so CUDA
graphs captured over slices of it read each step's values. On the CPU the host copy is the device tensor and an
upload is free.
"""
from __future__ import annotations

import numpy as np
import torch


class StagedBuffer:
    """A fixed-size device tensor plus its host staging copies; `np` is where this step's values go."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin_memory: bool, fill: int = 0
    ) -> None:
        with torch.inference_mode():  # like every step input: torch.compile guards on the dispatch keys
            self.device = torch.full(shape, fill, dtype=dtype, device=device)
        if device.type == "cpu":
            self._host = [self.device]
        else:
            self._host = [torch.full(shape, fill, dtype=dtype, pin_memory=pin_memory) for _ in range(2)]
        self._host_np = [t.numpy() for t in self._host]
        self._turn = 0

    @property
    def np(self) -> np.ndarray:
        """The staging copy this step writes (a numpy view of host memory)."""
        return self._host_np[self._turn]

    def upload(self, n: int) -> torch.Tensor:
        """Copy the first `n` elements (rows) of the staging copy to the device; returns the device slice.

        The next step then stages into the other host copy.
        """
        if len(self._host) == 1:
            return self.device[:n]
        self.device[:n].copy_(self._host[self._turn][:n], non_blocking=True)
        self._turn ^= 1
        return self.device[:n]

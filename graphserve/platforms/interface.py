"""The small interface every platform (CPU, CUDA, ROCm) implements."""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class PlatformEnum(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    ROCM = "rocm"


@dataclass(frozen=True)
class PlatformCapabilities:
    """Static facts the engine branches on (never `isinstance` on a platform)."""

    supports_graphs: bool  # CUDA/HIP graph capture
    supports_bf16: bool
    supports_pin_memory: bool


class Platform(ABC):
    """A device family: how to name it, measure it and which kernels run on it."""

    name: PlatformEnum
    device_type: str  # torch device type
    dispatch_key: str  # torch.library dispatch key for this platform's kernels
    dist_backend: str  # torch.distributed backend
    capabilities: PlatformCapabilities

    def device(self, index: int = 0) -> torch.device:
        """The torch device for local rank `index`."""
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    @abstractmethod
    def device_name(self, index: int = 0) -> str:
        """A human-readable device name."""

    @abstractmethod
    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of memory usable for weights, activations and the KV cache."""

    @abstractmethod
    def synchronize(self, device: torch.device) -> None:
        """Wait for all queued work on `device`."""

    def default_kv_cache_memory(self, device: torch.device, utilization: float) -> int:
        """Bytes for the KV pool when the user gave no explicit budget."""
        free, _ = self.mem_get_info(device)
        return int(free * utilization)

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

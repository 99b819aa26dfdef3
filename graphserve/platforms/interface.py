"""The small interface every platform (CPU, CUDA, ROCm) implements, and the facts it reports."""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from graphserve.platforms.kernels import KernelChoice, resolve_kernel_choices


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
    # torch.compile by default: on GPUs it pays for itself; on CPU a ~20 s first compile outweighs it (opt in).
    compile_by_default: bool = False
    # The device allocator reports current/peak bytes, so the KV pool can be sized by profiling a dummy batch.
    supports_memory_profiling: bool = False
    # Launch step N+1 before step N's tokens reach the host: pays off where the device runs apart from the host.
    async_scheduling_by_default: bool = False


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about one device, from the vendor's management library when it answers, else from torch."""

    index: int
    name: str
    total_memory: int  # bytes
    compute_capability: str | None  # "9.0" on NVIDIA, the gfx target (e.g. "gfx942") on AMD
    max_sm_clock_mhz: int | None
    max_memory_clock_mhz: int | None
    driver_version: str | None
    source: str  # "nvml", "amdsmi", "torch" or "host": where the facts came from


class Platform(ABC):
    """A device family: how to name it, measure it and which kernels run on it."""

    name: PlatformEnum
    device_type: str  # torch device type
    dispatch_key: str  # torch.library dispatch key for this platform's kernels
    dist_backend: str  # torch.distributed backend
    capabilities: PlatformCapabilities
    # The attention backend used unless --attention-backend names another (graphserve/attention/backends/registry).
    default_attention_backend: str = "PAGED_ATTN"

    def device(self, index: int = 0) -> torch.device:
        """The torch device for local rank `index`."""
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    @abstractmethod
    def device_name(self, index: int = 0) -> str:
        """A human-readable device name."""

    def device_count(self) -> int:
        """How many devices of this platform this process sees."""
        return 1

    @abstractmethod
    def device_info(self, index: int = 0) -> DeviceInfo:
        """Name, memory, clocks and compute capability of device `index`."""

    @abstractmethod
    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of memory usable for weights, activations and the KV cache."""

    @abstractmethod
    def synchronize(self, device: torch.device) -> None:
        """Wait for all queued work on `device`."""

    def default_kv_cache_memory(self, device: torch.device, utilization: float) -> int:
        """Bytes for the KV pool when the user gave no explicit budget and the platform cannot profile."""
        free, _ = self.mem_get_info(device)
        return int(free * utilization)

    def register_device_kernels(self) -> dict[str, str]:
        """Register this platform's kernels on its dispatch key once; returns {op name: "triton" | "csrc"}."""
        return {}

    def supports_fp8_gemm(self, device: torch.device) -> bool:
        """Whether FP8 (e4m3) GEMMs run on `device` at speed (tensor cores); the CPU runs the reference instead."""
        return False

    def kernel_choices(self) -> dict[str, KernelChoice]:
        """Which implementation runs each `torch.ops.graphserve` op here, and whether it can be graph-captured.

        The first call registers the platform's device kernels, so call it before the first forward.
        """
        return resolve_kernel_choices(self.dispatch_key, self.register_device_kernels())

    # Allocator statistics for KV sizing; meaningful only where capabilities.supports_memory_profiling.
    def empty_cache(self, device: torch.device) -> None:
        """Return cached, unused allocator blocks to the device."""
        return None

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        """Start a new peak measurement."""
        return None

    def memory_allocated(self, device: torch.device) -> tuple[int, int]:
        """(current, peak since the last reset) bytes held by tensors; (0, 0) where the allocator keeps no stats."""
        return 0, 0

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    # Streams, events and graphs: what async scheduling and CUDA/HIP graphs need, named only here.
    def record_event(self) -> DeviceEvent | None:
        """An event recorded on the current stream (None where work runs synchronously, as on the CPU)."""
        return None

    def graph_pool_handle(self) -> object:
        """A memory pool that graphs captured with it share (None where there are no graphs)."""
        return None

    def create_graph(self, pool: object) -> DeviceGraph:
        """An empty device graph that captures into `pool`."""
        raise NotImplementedError(f"the {self.name.value} platform has no graph capture")


class DeviceEvent(Protocol):
    """A point in a device stream the host can wait for."""

    def synchronize(self) -> None:
        """Block until the work queued before the event has finished."""


class DeviceGraph(Protocol):
    """A captured sequence of device work (CUDA/HIP graph)."""

    def capture(self, fn: Callable[[], None]) -> None:
        """Record `fn`'s kernels and the buffers they touch."""

    def replay(self) -> None:
        """Re-launch the recorded work."""

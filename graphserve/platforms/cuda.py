"""NVIDIA GPUs (and AMD GPUs through HIP, which PyTorch exposes as the `cuda` device)."""
from __future__ import annotations

import torch

from graphserve.platforms.interface import Platform, PlatformCapabilities, PlatformEnum


class CudaPlatform(Platform):
    """CUDA devices; kernels are chosen per op by the ops layer through `dispatch_key`."""

    name = PlatformEnum.CUDA
    device_type = "cuda"
    dispatch_key = "CUDA"
    dist_backend = "nccl"
    capabilities = PlatformCapabilities(supports_graphs=True, supports_bf16=True, supports_pin_memory=True)

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


class RocmPlatform(CudaPlatform):
    """AMD GPUs under ROCm/HIP: same torch device type, its own name and collective backend."""

    name = PlatformEnum.ROCM
    dist_backend = "nccl"  # RCCL answers to the nccl backend name in PyTorch

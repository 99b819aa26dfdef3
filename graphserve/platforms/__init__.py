"""Platform detection: `current_platform` is resolved lazily on first use."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.platforms.interface import Platform

_current: Platform | None = None


def resolve_platform(device: str = "auto") -> Platform:
    """The platform for a device string: 'auto' picks CUDA/ROCm when a GPU is visible, else CPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        from graphserve.platforms.cpu import CpuPlatform

        return CpuPlatform()
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no GPU is visible to torch")
    # A ROCm build of torch answers to "cuda" too; torch.version.hip tells them apart.
    if torch.version.hip:
        from graphserve.platforms.rocm import RocmPlatform

        return RocmPlatform()
    from graphserve.platforms.cuda import CudaPlatform

    return CudaPlatform()


def get_platform(name: str) -> Platform:
    """The platform named "cpu", "cuda" or "rocm" (as resolved earlier by `resolve_platform`), without detection."""
    if name == "cpu":
        from graphserve.platforms.cpu import CpuPlatform

        return CpuPlatform()
    if name == "cuda":
        from graphserve.platforms.cuda import CudaPlatform

        return CudaPlatform()
    if name == "rocm":
        from graphserve.platforms.rocm import RocmPlatform

        return RocmPlatform()
    raise ValueError(f"unknown platform {name!r}; known: cpu, cuda, rocm")


def current_platform() -> Platform:
    """The platform of this process (auto-detected once)."""
    global _current
    if _current is None:
        _current = resolve_platform("auto")
    return _current

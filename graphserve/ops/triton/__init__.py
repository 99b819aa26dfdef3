"""Triton kernels for `torch.ops.graphserve.*`, registered on a device dispatch key by the platform.

Nothing is registered at import time: the CPU keeps the torch references, and a CUDA/ROCm platform calls
`register_triton_kernels()` once. Each kernel module exposes `register(dispatch_key) -> dict[op, "triton"]`
and is imported lazily here, so importing this package never compiles or imports Triton.
"""
from __future__ import annotations

import importlib

# One entry per kernel module (each keeps its own kernels, wrappers and `register`).
_KERNEL_MODULES: tuple[str, ...] = (
    "reshape_and_cache",
    "paged_attention",
    "layernorm",
    "rotary",
    "activation",
    "sampling",
    "quant",
    "gguf",
    "lora",
    "moe",
    "rejection_sampler",
)


def triton_available() -> bool:
    """Whether the `triton` package can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register_triton_kernels(dispatch_key: str = "CUDA") -> dict[str, str]:
    """Register every available Triton kernel on `dispatch_key`; returns {op_name: "triton"} (idempotent)."""
    if not triton_available():
        return {}
    import graphserve.ops  # noqa: F401  (defines the ops the kernels attach to)

    registered: dict[str, str] = {}
    for name in _KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        registered.update(module.register(dispatch_key))
    return registered

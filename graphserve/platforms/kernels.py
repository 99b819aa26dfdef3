"""Which implementation runs each `torch.ops.graphserve` op on a platform, and whether it can be graph-captured.

The ops are defined once with a pure-torch reference on "CompositeExplicitAutograd"; a platform adds device
kernels (Triton, later csrc) on its own dispatch key, which then take precedence. This module reads that state
back and registers the Triton kernels once per process.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_triton_kernels: dict[str, dict[str, str]] = {}  # dispatch key -> {op: "triton"}, filled once per key
_triton_unavailable: dict[str, str] = {}  # dispatch key -> why the torch reference runs instead


@dataclass(frozen=True)
class KernelChoice:
    """The implementation behind one op on one platform."""

    impl: str  # "triton" | "csrc" | "cublas" (torch's CUDA libraries) | "torch" (the reference) | "custom"
    graph_safe: bool  # no host syncs and no allocations that move: may run inside a captured CUDA/HIP graph

    def __str__(self) -> str:
        return f"{self.impl} ({'graph-safe' if self.graph_safe else 'not graph-safe'})"


def _load_all_ops() -> dict:
    """Import every op family and return the registry."""
    import graphserve.ops  # noqa: F401  (registers the op families)
    from graphserve.ops._register import registered_ops

    return registered_ops()


def _origin(kernel: object) -> str:
    """Name a kernel registered by someone other than the platform by where its code lives."""
    module = getattr(kernel, "__module__", None) or ""
    if module.startswith("graphserve.ops.triton"):
        return "triton"
    if module.startswith("graphserve.csrc") or module.startswith("torch.ops"):
        return "csrc"
    return "custom"


def resolve_kernel_choices(dispatch_key: str, device_kernels: dict[str, str]) -> dict[str, KernelChoice]:
    """Per op: the device kernel registered on `dispatch_key` (named by `device_kernels`) or the torch reference."""
    ops = _load_all_ops()
    impls: dict[str, str] = {}
    for name, op in ops.items():
        if dispatch_key in op.kernels:
            impls[name] = device_kernels.get(name) or _origin(op.kernels[dispatch_key])
        else:
            impls[name] = "torch"
    # Graph safety is declared at registration: a reference that syncs with the host says so.
    return {name: KernelChoice(impls[name], impls[name] != "torch" or ops[name].reference_graph_safe)
            for name in sorted(impls)}


def register_triton_kernels_once(dispatch_key: str) -> dict[str, str]:
    """Register graphserve's Triton kernels on `dispatch_key` once; {} (torch reference) when Triton is missing."""
    if dispatch_key in _triton_kernels:
        return _triton_kernels[dispatch_key]
    reason = None
    kernels: dict[str, str] = {}
    if importlib.util.find_spec("triton") is None:
        reason = "the triton package is not installed"
    else:
        try:
            from graphserve.ops.triton import register_triton_kernels
        except ImportError as e:  # triton present but unusable, or a build without the kernels
            reason = f"the Triton kernels cannot be imported ({e})"
        else:
            kernels = dict(register_triton_kernels(dispatch_key=dispatch_key))
    if reason is not None:
        _triton_unavailable[dispatch_key] = reason
        logger.warning("%s: running the torch reference ops (slow; CUDA/HIP graphs need graph-safe kernels)", reason)
    _triton_kernels[dispatch_key] = kernels
    return kernels


def triton_unavailable_reason(dispatch_key: str) -> str | None:
    """Why the Triton kernels are not used on `dispatch_key` (None when they are, or were never asked for)."""
    return _triton_unavailable.get(dispatch_key)


_cublas_kernels: dict[str, dict[str, str]] = {}


def register_cublas_kernels_once(dispatch_key: str, fp8_gemm: bool) -> dict[str, str]:
    """Register the ops served by torch's own CUDA libraries on `dispatch_key` once: the FP8 scaled GEMM through
    cuBLASLt (`torch._scaled_mm`) when the platform says the GPU has FP8 tensor cores (`fp8_gemm`). {} elsewhere
    (the reference runs)."""
    if dispatch_key not in _cublas_kernels:
        from graphserve.ops._register import get_op
        from graphserve.ops.fp8 import fp8_scaled_mm_cublas

        kernels: dict[str, str] = {}
        if fp8_gemm:
            get_op("fp8_scaled_mm").impl(dispatch_key, fp8_scaled_mm_cublas)
            kernels["fp8_scaled_mm"] = "cublas"
        _cublas_kernels[dispatch_key] = kernels
    return _cublas_kernels[dispatch_key]

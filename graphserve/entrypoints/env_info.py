"""What `graphserve env` reports: versions, the platform, its devices and the kernel chosen for every op."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform as py_platform
from typing import Any


def _version(*distributions: str) -> str | None:
    """The installed version of the first distribution found (without importing it), else None."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def collect_env() -> dict[str, Any]:
    """Versions, platform facts, per-device facts and per-op kernel choices, as plain JSON-able values."""
    import torch

    from graphserve import __version__
    from graphserve.platforms import current_platform
    from graphserve.platforms.kernels import triton_unavailable_reason

    plat = current_platform()
    choices = plat.kernel_choices()
    devices = [dataclasses.asdict(plat.device_info(i)) for i in range(plat.device_count())]
    return {
        "versions": {
            "graphserve": __version__,
            "python": py_platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton", "pytorch-triton-rocm", "pytorch-triton"),
            "transformers": _version("transformers"),
            "cuda": torch.version.cuda,
            "hip": torch.version.hip,
        },
        "platform": {
            "platform": plat.name.value,
            "dispatch_key": plat.dispatch_key,
            "supports_graphs": plat.capabilities.supports_graphs,
            "compile_by_default": plat.capabilities.compile_by_default,
            "triton_kernels": triton_unavailable_reason(plat.dispatch_key) or (
                "registered" if any(c.impl == "triton" for c in choices.values()) else "not used on this platform"
            ),
        },
        "devices": devices,
        "kernels": {op: {"impl": c.impl, "graph_safe": c.graph_safe} for op, c in choices.items()},
    }


def format_env(info: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    lines = []
    for key, value in info["versions"].items():
        lines.append(f"{key:22s} {value if value is not None else '-'}")
    for key, value in info["platform"].items():
        lines.append(f"{key:22s} {value}")
    for dev in info["devices"]:
        clocks = (f", max clocks {dev['max_sm_clock_mhz']}/{dev['max_memory_clock_mhz']} MHz"
                  if dev["max_sm_clock_mhz"] else "")
        cc = f", compute capability {dev['compute_capability']}" if dev["compute_capability"] else ""
        driver = f", driver {dev['driver_version']}" if dev["driver_version"] else ""
        lines.append(f"device {dev['index']:<15d} {dev['name']}, {dev['total_memory'] / 2**30:.1f} GiB"
                     f"{cc}{clocks}{driver} [{dev['source']}]")
    lines.append("kernels")
    for op, choice in info["kernels"].items():
        lines.append(f"  {op:24s} {choice['impl']:7s} {'graph-safe' if choice['graph_safe'] else 'not graph-safe'}")
    return "\n".join(lines)

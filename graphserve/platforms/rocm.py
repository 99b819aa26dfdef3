"""AMD GPUs under ROCm/HIP: PyTorch exposes them as the `cuda` device; device facts come from amdsmi."""
from __future__ import annotations

from graphserve.platforms._imports import call_quietly, import_quietly
from graphserve.platforms.cuda import CudaPlatform, torch_device_info
from graphserve.platforms.interface import DeviceInfo, PlatformEnum


def _read_amdsmi(amdsmi, index: int) -> DeviceInfo:
    amdsmi.amdsmi_init()
    try:
        # amdsmi enumerates every GPU of the node; without a visibility mask its order is HIP's.
        handle = amdsmi.amdsmi_get_processor_handles()[index]
        asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
        gfx = amdsmi.amdsmi_get_clock_info(handle, amdsmi.AmdSmiClkType.GFX)
        mem = amdsmi.amdsmi_get_clock_info(handle, amdsmi.AmdSmiClkType.MEM)
        driver, _ = call_quietly(amdsmi.amdsmi_get_gpu_driver_info, handle)

        def mhz(value):
            return int(value) if isinstance(value, (int, float)) else None  # "N/A" when unsupported

        return DeviceInfo(
            index=index,
            name=str(asic.get("market_name", "AMD GPU")),
            total_memory=int(amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM)),
            compute_capability=str(asic.get("target_graphics_version")) or None,
            max_sm_clock_mhz=mhz(gfx.get("max_clk")),
            max_memory_clock_mhz=mhz(mem.get("max_clk")),
            driver_version=str(driver.get("driver_version")) if isinstance(driver, dict) else None,
            source="amdsmi",
        )
    finally:
        call_quietly(amdsmi.amdsmi_shut_down)


def amdsmi_device_info(index: int) -> DeviceInfo | None:
    """Device facts from amdsmi; None when it is missing or ROCm's library is absent (never raises or prints)."""
    amdsmi = import_quietly("amdsmi")
    if amdsmi is None:
        return None
    info, _ = call_quietly(_read_amdsmi, amdsmi, index)
    return info


class RocmPlatform(CudaPlatform):
    """AMD GPUs: same torch device type and dispatch key as CUDA, its own device facts and collective name."""

    name = PlatformEnum.ROCM
    dist_backend = "nccl"  # RCCL answers to the nccl backend name in PyTorch

    def device_info(self, index: int = 0) -> DeviceInfo:
        return amdsmi_device_info(index) or torch_device_info(index)

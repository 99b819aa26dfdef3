"""The CPU platform: torch reference ops, no graphs; a real platform, not a fallback."""
from __future__ import annotations

import os
import platform as _py_platform

import torch

from graphserve.platforms.interface import DeviceInfo, Platform, PlatformCapabilities, PlatformEnum

# The KV pool on CPU shares RAM with everything else; like vLLM's VLLM_CPU_KVCACHE_SPACE default we take a
# modest fixed share instead of a fraction of free memory.
_CPU_DEFAULT_KV_BYTES = 2 << 30


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class CpuPlatform(Platform):
    """Runs everything with torch on the host CPU."""

    name = PlatformEnum.CPU
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"
    capabilities = PlatformCapabilities(supports_graphs=False, supports_bf16=True, supports_pin_memory=False)

    def device_name(self, index: int = 0) -> str:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return _py_platform.processor() or _py_platform.machine()

    def device_info(self, index: int = 0) -> DeviceInfo:
        _, total = self.mem_get_info(self.device())
        return DeviceInfo(
            index=0, name=f"{self.device_name()} ({os.cpu_count()} cores)", total_memory=total,
            compute_capability=None, max_sm_clock_mhz=None, max_memory_clock_mhz=None, driver_version=None,
            source="host",
        )

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        try:
            return _meminfo_bytes("MemAvailable"), _meminfo_bytes("MemTotal")
        except (OSError, KeyError):
            return _CPU_DEFAULT_KV_BYTES * 4, _CPU_DEFAULT_KV_BYTES * 8

    def synchronize(self, device: torch.device) -> None:
        return None

    def default_kv_cache_memory(self, device: torch.device, utilization: float) -> int:
        free, _ = self.mem_get_info(device)
        return min(_CPU_DEFAULT_KV_BYTES, free // 4)

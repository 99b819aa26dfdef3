"""NVIDIA GPUs: device facts from NVML (nvidia-ml-py), Triton kernels on the "CUDA" dispatch key."""
from __future__ import annotations

import torch

from graphserve.platforms._imports import call_quietly, import_quietly
from graphserve.platforms.interface import (
    DeviceEvent,
    DeviceGraph,
    DeviceInfo,
    Platform,
    PlatformCapabilities,
    PlatformEnum,
)
from graphserve.platforms.kernels import register_cublas_kernels_once, register_triton_kernels_once


def _nvml_uuid(index: int) -> str | None:
    """The device's UUID as NVML spells it ("GPU-..."), which survives CUDA_VISIBLE_DEVICES renumbering."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def _read_nvml(pynvml, index: int, uuid: str | None) -> DeviceInfo:
    pynvml.nvmlInit()
    try:
        handle = None
        if uuid is not None:
            handle, _ = call_quietly(pynvml.nvmlDeviceGetHandleByUUID, uuid)
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return DeviceInfo(
            index=index,
            name=name.decode() if isinstance(name, bytes) else name,
            total_memory=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            compute_capability=f"{major}.{minor}",
            max_sm_clock_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            max_memory_clock_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
            driver_version=driver.decode() if isinstance(driver, bytes) else driver,
            source="nvml",
        )
    finally:
        call_quietly(pynvml.nvmlShutdown)


def nvml_device_info(index: int, uuid: str | None = None) -> DeviceInfo | None:
    """Device facts from NVML; None when nvidia-ml-py or the driver library is missing (never raises)."""
    pynvml = import_quietly("pynvml")
    if pynvml is None:
        return None
    info, _ = call_quietly(_read_nvml, pynvml, index, uuid)
    return info


def torch_device_info(index: int) -> DeviceInfo:
    """What torch itself knows about a GPU (no clocks): the fallback when the vendor library is absent."""
    props = torch.cuda.get_device_properties(index)
    arch = getattr(props, "gcnArchName", None) if torch.version.hip else None
    return DeviceInfo(
        index=index,
        name=props.name,
        total_memory=int(props.total_memory),
        compute_capability=arch.split(":")[0] if arch else f"{props.major}.{props.minor}",
        max_sm_clock_mhz=None,
        max_memory_clock_mhz=None,
        driver_version=None,
        source="torch",
    )


class CudaGraph:
    """A torch.cuda.CUDAGraph (CUDA or HIP) captured into a memory pool shared with other graphs."""

    def __init__(self, pool: object) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn) -> None:
        """Capture `fn` on torch's side capture stream."""
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self) -> None:
        """Launch the whole graph with one call."""
        self.graph.replay()


class CudaPlatform(Platform):
    """CUDA devices; Triton kernels are registered on the "CUDA" dispatch key on first use."""

    name = PlatformEnum.CUDA
    device_type = "cuda"
    dispatch_key = "CUDA"
    dist_backend = "nccl"
    capabilities = PlatformCapabilities(
        supports_graphs=True, supports_bf16=True, supports_pin_memory=True,
        compile_by_default=True, supports_memory_profiling=True, async_scheduling_by_default=True,
    )

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_info(self, index: int = 0) -> DeviceInfo:
        uuid, _ = call_quietly(_nvml_uuid, index)
        return nvml_device_info(index, uuid) or torch_device_info(index)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def supports_fp8_gemm(self, device: torch.device) -> bool:
        """FP8 tensor cores: compute capability 8.9 (Ada) and up."""
        return torch.cuda.get_device_capability(device) >= (8, 9)

    def register_device_kernels(self) -> dict[str, str]:
        fp8 = self.supports_fp8_gemm(torch.device("cuda", torch.cuda.current_device()))
        return {**register_triton_kernels_once(self.dispatch_key),
                **register_cublas_kernels_once(self.dispatch_key, fp8_gemm=fp8)}

    def empty_cache(self, device: torch.device) -> None:
        torch.cuda.empty_cache()

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)

    def record_event(self) -> DeviceEvent:
        event = torch.cuda.Event()
        event.record()
        return event

    def graph_pool_handle(self) -> object:
        return torch.cuda.graph_pool_handle()

    def create_graph(self, pool: object) -> DeviceGraph:
        return CudaGraph(pool)

"""Platform detection, vendor-library guards (simulated failures) and the kernel choice per op."""
import sys
import types

import pytest
import torch

from graphserve.platforms import kernels, resolve_platform
from graphserve.platforms.cpu import CpuPlatform
from graphserve.platforms.cuda import CudaPlatform, nvml_device_info
from graphserve.platforms.interface import PlatformEnum
from graphserve.platforms.rocm import RocmPlatform, amdsmi_device_info


def test_cpu_detected_without_gpu():
    assert not torch.cuda.is_available()
    plat = resolve_platform("auto")
    assert isinstance(plat, CpuPlatform) and plat.name == PlatformEnum.CPU
    assert not plat.capabilities.supports_graphs and not plat.capabilities.compile_by_default
    info = plat.device_info()
    assert info.source == "host" and info.total_memory > 0
    with pytest.raises(ValueError, match="no GPU is visible"):
        resolve_platform("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_platform("tpu")


@pytest.mark.parametrize("hip, expected", [(None, CudaPlatform), ("6.2.41133", RocmPlatform)])
def test_gpu_flavour_from_torch_version_hip(monkeypatch, hip, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    plat = resolve_platform("auto")
    assert type(plat) is expected
    assert plat.dispatch_key == "CUDA" and plat.capabilities.supports_graphs and plat.capabilities.compile_by_default


def test_cpu_kernel_choices_are_the_torch_references():
    choices = CpuPlatform().kernel_choices()
    families = ("paged_attention", "reshape_and_cache", "rms_norm", "fused_add_rms_norm", "rotary_embedding",
                "silu_and_mul", "unified_attention")
    assert {choices[name].impl for name in families} == {"torch"}
    # The reference attention syncs with the host, so it cannot be captured (and the backend using it neither).
    assert not choices["paged_attention"].graph_safe and not choices["reshape_and_cache"].graph_safe
    assert choices["rms_norm"].graph_safe
    assert choices["unified_attention"].graph_safe  # a router: as capturable as the backend it routes to


def test_device_kernels_change_the_choice(monkeypatch):
    from graphserve.ops._register import registered_ops

    op = registered_ops()["paged_attention"]
    monkeypatch.setitem(op.kernels, "FakeKey", object())  # as if a Triton kernel were registered on it
    monkeypatch.setitem(registered_ops()["reshape_and_cache"].kernels, "FakeKey", object())
    choices = kernels.resolve_kernel_choices("FakeKey", {"paged_attention": "triton", "reshape_and_cache": "triton"})
    assert str(choices["paged_attention"]) == "triton (graph-safe)"
    from graphserve.attention.backends.paged import PagedAttentionBackend

    assert PagedAttentionBackend.graph_blockers(choices) == []  # everything it runs is graph-safe now
    assert choices["rms_norm"].impl == "torch"
    # A kernel the platform did not name is labelled by where its code lives.
    monkeypatch.setitem(registered_ops()["rms_norm"].kernels, "FakeKey", test_device_kernels_change_the_choice)
    assert kernels.resolve_kernel_choices("FakeKey", {})["rms_norm"].impl == "custom"


def test_missing_triton_stays_on_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_triton_kernels", {})
    monkeypatch.setattr(kernels, "_triton_unavailable", {})
    real_find_spec = kernels.importlib.util.find_spec
    monkeypatch.setattr(kernels.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert kernels.register_triton_kernels_once("CUDA") == {}
    assert "not installed" in kernels.triton_unavailable_reason("CUDA")
    assert "torch reference" in caplog.text


def _install_fake_module(monkeypatch, tmp_path, name, source):
    """Put a package `name` with `source` as its __init__ first on sys.path (and out of sys.modules)."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Whatever the test imports under `name` is dropped from sys.modules again when it ends.
    monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, name)


def test_amdsmi_import_failure_neither_raises_nor_prints(monkeypatch, tmp_path, capsys):
    # What `import amdsmi` does on a machine without ROCm: print to stdout, then raise KeyError.
    _install_fake_module(monkeypatch, tmp_path, "amdsmi", (
        "print('/opt/rocm/lib/libamd_smi.so: cannot open shared object file')\n"
        "raise KeyError('libamd_smi.so')\n"))
    assert amdsmi_device_info(0) is None
    assert capsys.readouterr().out == ""
    monkeypatch.setattr("graphserve.platforms.rocm.torch_device_info", lambda i: f"torch facts of {i}")
    assert RocmPlatform().device_info(1) == "torch facts of 1"


def test_amdsmi_facts(monkeypatch, tmp_path):
    _install_fake_module(monkeypatch, tmp_path, "amdsmi", """
import enum
class AmdSmiClkType(enum.IntEnum):
    GFX = 0
    MEM = 1
class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
def amdsmi_init(): pass
def amdsmi_shut_down(): pass
def amdsmi_get_processor_handles(): return ["h0", "h1"]
def amdsmi_get_gpu_asic_info(h): return {"market_name": "AMD Instinct MI300X", "target_graphics_version": "gfx942"}
def amdsmi_get_clock_info(h, t): return {"max_clk": 2100 if t == AmdSmiClkType.GFX else 1300}
def amdsmi_get_gpu_memory_total(h, t): return 192 << 30
def amdsmi_get_gpu_driver_info(h): return {"driver_version": "6.8.5"}
""")
    info = amdsmi_device_info(1)
    assert (info.name, info.total_memory, info.compute_capability) == ("AMD Instinct MI300X", 192 << 30, "gfx942")
    assert (info.max_sm_clock_mhz, info.max_memory_clock_mhz, info.driver_version) == (2100, 1300, "6.8.5")
    assert info.source == "amdsmi"


def test_nvml_without_driver_returns_none(monkeypatch, tmp_path, capsys):
    # nvidia-ml-py imports everywhere; without the driver library nvmlInit raises NVMLError_LibraryNotFound.
    _install_fake_module(monkeypatch, tmp_path, "pynvml", """
class NVMLError(Exception): pass
class NVMLError_LibraryNotFound(NVMLError): pass
def nvmlInit():
    print('NVML Shared Library Not Found')
    raise NVMLError_LibraryNotFound()
""")
    assert nvml_device_info(0) is None
    assert capsys.readouterr().out == ""


def test_nvml_missing_package_returns_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    assert nvml_device_info(0) is None


def test_nvml_facts(monkeypatch):
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: ("by-uuid", uuid),
        nvmlDeviceGetHandleByIndex=lambda i: ("by-index", i),
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlSystemGetDriverVersion=lambda: "580.65.06",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=150 << 30),
        nvmlDeviceGetMaxClockInfo=lambda h, kind: {1: 1980, 2: 3201}[kind],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = nvml_device_info(0, uuid="GPU-1234")
    assert (info.name, info.total_memory, info.compute_capability) == ("NVIDIA H200", 150 << 30, "9.0")
    assert (info.max_sm_clock_mhz, info.max_memory_clock_mhz, info.driver_version) == (1980, 3201, "580.65.06")
    assert info.source == "nvml"

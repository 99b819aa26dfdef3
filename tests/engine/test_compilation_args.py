"""EngineArgs -> CompilationConfig / SchedulerConfig: platform defaults, --enforce-eager, --compile, --cuda-graph-sizes,
--[no-]async-scheduling."""
import argparse

import pytest
import torch

from graphserve.config import CompilationConfig, CompilationLevel
from graphserve.engine.arg_utils import EngineArgs


def _parse(argv):
    return EngineArgs.from_cli_args(EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(argv))


def test_cli_flags():
    args = _parse(["--enforce-eager", "--cuda-graph-sizes", "1", "8", "4"])
    assert args.enforce_eager and args.cuda_graph_sizes == [1, 8, 4] and args.compile is None
    assert _parse(["--compile"]).compile is True
    assert _parse(["--no-compile"]).compile is False


def test_cpu_defaults_to_eager_and_compile_opts_in():
    cc = EngineArgs(device="cpu").create_compilation_config(max_num_seqs=256)
    assert cc.level == CompilationLevel.NO_COMPILATION and not cc.use_cudagraph
    cc = EngineArgs(device="cpu", compile=True).create_compilation_config(max_num_seqs=256)
    assert cc.level == CompilationLevel.INDUCTOR and not cc.use_cudagraph
    assert cc.cache_dir  # persistent inductor cache under the graphserve cache root


def test_gpu_defaults_to_compile_and_graphs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    cc = EngineArgs(device="cuda").create_compilation_config(max_num_seqs=20)
    assert cc.level == CompilationLevel.INDUCTOR and cc.use_cudagraph
    assert cc.cudagraph_capture_sizes == (1, 2, 4, 8, 16, 20) and cc.max_capture_size == 20
    cc = EngineArgs(device="cuda", cuda_graph_sizes=[64, 1, 8, 8]).create_compilation_config(max_num_seqs=32)
    assert cc.cudagraph_capture_sizes == (1, 8, 32)  # deduplicated, sorted, clipped to max_num_seqs
    cc = EngineArgs(device="cuda", compile=False).create_compilation_config(max_num_seqs=8)
    assert cc.level == CompilationLevel.NO_COMPILATION and cc.use_cudagraph  # graphs of the eager forward
    cc = EngineArgs(device="cuda", enforce_eager=True).create_compilation_config(max_num_seqs=8)
    assert cc.level == CompilationLevel.NO_COMPILATION and not cc.use_cudagraph and cc.max_capture_size == 0


def test_invalid_settings():
    with pytest.raises(ValueError, match="contradict"):
        EngineArgs(device="cpu", enforce_eager=True, compile=True).create_compilation_config(8)
    with pytest.raises(ValueError, match="positive"):
        EngineArgs(device="cpu", cuda_graph_sizes=[0, 4]).create_compilation_config(8)
    with pytest.raises(ValueError, match="ascending"):
        CompilationConfig(cudagraph_capture_sizes=(4, 2))
    with pytest.raises(ValueError, match="at least one"):
        CompilationConfig(use_cudagraph=True)
    with pytest.raises(ValueError, match="level"):
        CompilationConfig(level=3)


def test_async_scheduling_flag_and_platform_default(monkeypatch, tiny_model):
    assert _parse([]).async_scheduling is None
    assert _parse(["--async-scheduling"]).async_scheduling is True
    assert _parse(["--no-async-scheduling"]).async_scheduling is False
    model_dir = tiny_model("llama")[0]
    config = EngineArgs(model=model_dir, device="cpu").create_engine_config()
    assert config.scheduler_config.async_scheduling is False  # the CPU computes synchronously: nothing to overlap
    config = EngineArgs(model=model_dir, device="cpu", async_scheduling=True).create_engine_config()
    assert config.scheduler_config.async_scheduling is True
    from graphserve.platforms import resolve_platform

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_platform("cuda").capabilities.async_scheduling_by_default

"""KV sizing from a profiled peak: weights + activations + graphs + KV fit in gpu_memory_utilization."""
import pytest
import torch

from graphserve.worker.memory_profiler import (
    dummy_forward,
    dummy_sampler_run,
    model_weight_bytes,
    profile_kv_cache_memory,
)

GIB = 1 << 30


class FakeGpu:
    """A platform whose allocator statistics follow what the profiled functions 'allocate'."""

    def __init__(self, total, used):
        self.total, self.used, self.allocated, self.peak = total, used, 0, 0

    def synchronize(self, device):
        pass

    def empty_cache(self, device):
        pass

    def reset_peak_memory_stats(self, device):
        self.peak = self.allocated

    def memory_allocated(self, device):
        return self.allocated, self.peak

    def mem_get_info(self, device):
        return self.total - self.used, self.total

    def transient(self, nbytes):
        def run():
            self.peak = max(self.peak, self.allocated + nbytes)
        return run


def test_kv_gets_the_rest_of_the_budget():
    gpu = FakeGpu(total=100 * GIB, used=20 * GIB)
    profile = profile_kv_cache_memory(gpu, "cuda", 0.9, 16 * GIB, gpu.transient(3 * GIB), gpu.transient(1 * GIB))
    assert profile.activation_peak == 3 * GIB and profile.graph_estimate == 1 * GIB
    assert profile.budget == 90 * GIB
    assert profile.kv_cache_bytes == 90 * GIB - 20 * GIB - 3 * GIB - 1 * GIB
    assert "kv_cache_bytes 66.00 GiB" in profile.describe()
    no_graphs = profile_kv_cache_memory(gpu, "cuda", 0.5, 16 * GIB, gpu.transient(3 * GIB), None)
    assert no_graphs.kv_cache_bytes == 50 * GIB - 23 * GIB


def test_no_room_left_raises():
    gpu = FakeGpu(total=10 * GIB, used=8 * GIB)
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        profile_kv_cache_memory(gpu, "cuda", 0.9, 7 * GIB, gpu.transient(2 * GIB), None)


def test_dummy_runs_touch_no_kv_cache(tiny_model):
    from graphserve import LLM

    path, _ = tiny_model("llama")
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, enforce_eager=True)
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    kv_before = [kv.clone() for kv in runner.kv_caches]
    with torch.inference_mode():
        hidden = dummy_forward(runner.forward_fn, 300, 256, runner.device)  # more tokens than positions: wraps
        dummy_sampler_run(runner.model, runner.sampler, hidden, 8, runner.device)
    assert hidden.shape == (300, runner.model_config.hidden_size) and torch.isfinite(hidden).all()
    assert all(torch.equal(kv0, kv) for kv0, kv in zip(kv_before, runner.kv_caches))
    tensors = {id(t): t for t in list(runner.model.parameters()) + list(runner.model.buffers())}  # tied once
    assert model_weight_bytes(runner.model) == sum(t.numel() * t.element_size() for t in tensors.values())

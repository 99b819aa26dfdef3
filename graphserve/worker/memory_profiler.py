"""GPU memory sizing: profile the peak of a maximal step, then give the KV pool what is left of the budget.

The budget is `gpu_memory_utilization * total`. It must hold everything on the device after loading (weights,
the CUDA/HIP context, library workspaces, and anything else already on the GPU, counted conservatively), the
transient peak of the largest step (a dummy batch of max_num_batched_tokens tokens through the forward, the
LM head and the sampler, no KV cache), the graph pool (estimated as the peak of a forward at the largest
capture size: the pool keeps that graph's intermediates), and the KV cache.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphserve.attention.forward_context import set_forward_context
from graphserve.sample.metadata import SamplingRequestState, build_sampling_metadata
from graphserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryProfile:
    """The numbers behind the KV pool size (bytes)."""

    total_memory: int
    budget: int  # gpu_memory_utilization * total_memory
    weights: int
    used_after_profile: int  # in use on the device with the model loaded and the allocator cache emptied
    activation_peak: int  # transient peak of the maximal step
    graph_estimate: int  # expected size of the shared graph pool (0 without graphs)
    kv_cache_bytes: int

    def describe(self) -> str:
        """One log line with every figure in GiB."""
        fields = ("total_memory", "budget", "weights", "used_after_profile", "activation_peak", "graph_estimate",
                  "kv_cache_bytes")
        return ", ".join(f"{name} {getattr(self, name) / _GIB:.2f} GiB" for name in fields)


def dummy_forward(
    forward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_tokens: int,
    max_model_len: int,
    device: torch.device,
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """Run the forward on `num_tokens` dummy tokens without attention metadata: no KV cache is read or written."""
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(num_tokens, dtype=torch.int64, device=device) % max_model_len
    with set_forward_context(None, None):
        return forward_fn(input_ids, positions)


def dummy_sampler_run(
    model: torch.nn.Module,
    sampler: torch.nn.Module,
    hidden_states: torch.Tensor,  # [>= num_reqs, hidden_size]
    num_reqs: int,
    device: torch.device,
    pin_memory: bool = False,
) -> None:
    """LM head and sampler on `num_reqs` rows with the costliest settings (top-k, top-p, penalties, logprobs)."""
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1,
                            frequency_penalty=0.1, logprobs=SamplingParams.MAX_LOGPROBS)
    states = [SamplingRequestState(f"profile-{i}", params, [0], [0]) for i in range(num_reqs)]
    logits = model.compute_logits(hidden_states[:num_reqs])
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    sampler(logits, build_sampling_metadata(states, logits.shape[-1], device, generator, pin_memory))


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _peak_of(platform, device: torch.device, fn: Callable[[], object]) -> int:
    """Bytes `fn` allocates at its peak above what was allocated before it (its results freed afterwards)."""
    platform.synchronize(device)
    before, _ = platform.memory_allocated(device)
    platform.reset_peak_memory_stats(device)
    fn()
    platform.synchronize(device)
    _, peak = platform.memory_allocated(device)
    return max(0, peak - before)


def profile_kv_cache_memory(
    platform,
    device: torch.device,
    gpu_memory_utilization: float,
    weights: int,
    run_max_step: Callable[[], object],
    run_max_graph_batch: Callable[[], object] | None,
) -> MemoryProfile:
    """Measure the step and graph peaks, then size the KV pool to fill `gpu_memory_utilization` of the device."""
    activation_peak = _peak_of(platform, device, run_max_step)
    graph_estimate = _peak_of(platform, device, run_max_graph_batch) if run_max_graph_batch is not None else 0
    platform.empty_cache(device)
    free, total = platform.mem_get_info(device)
    used = total - free
    budget = int(total * gpu_memory_utilization)
    kv_bytes = budget - used - activation_peak - graph_estimate
    profile = MemoryProfile(total, budget, weights, used, activation_peak, graph_estimate, max(kv_bytes, 0))
    logger.info("memory profile: %s", profile.describe())
    if kv_bytes <= 0:
        raise ValueError(
            f"no memory left for the KV cache ({profile.describe()}); raise --gpu-memory-utilization, lower "
            "--max-num-batched-tokens / --max-num-seqs, or free the GPU"
        )
    return profile

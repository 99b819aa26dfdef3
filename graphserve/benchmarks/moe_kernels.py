"""Timing of the fused MoE op (GPU only) at real MoE shapes, against a per-expert loop of bf16 GEMMs.

Each point routes T random tokens (softmax top-k over random router logits) and times `graphserve::fused_moe`
by replaying a CUDA graph. The loop baseline is what an engine without the op runs: for each expert with tokens,
gather them, two dense GEMMs, scatter-add; it reads the routing on the host, so it is timed with CUDA events.
Bandwidth counts the bytes of the experts actually used (each expert hit at least once is read once).
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from graphserve.benchmarks.attention_kernels import cuda_ceilings, time_graph
from graphserve.benchmarks.roofline import fraction
from graphserve.ops import moe as moe_ops

# name -> (experts, top-k, hidden, expert intermediate size)
MOE_SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}


def _per_expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for expert in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == expert)
        gate, up = F.linear(x[token_idx], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * weights[token_idx, slot, None].to(x.dtype)
        out.index_add_(0, token_idx, y)
    return out


def _time_events(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_moe(name: str, token_counts: list[int], dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per token count: fused op µs, GB/s over the used experts' bytes and its fraction of the copy
    ceiling, the per-expert loop's µs and the speedup."""
    num_experts, top_k, hidden, inter = MOE_SHAPES[name]
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * 0.02).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") * 0.02).to(dtype)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    peak = getattr(cuda_ceilings(), "bytes_per_s", None)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        weights, ids = moe_ops.select_experts(torch.randn(tokens, num_experts, device="cuda"), top_k, True)
        out = torch.empty_like(x)
        fused = time_graph(lambda: torch.ops.graphserve.fused_moe(out, x, w13, w2, weights, ids))  # noqa: B023
        loop = _time_events(lambda: _per_expert_loop(x, w13, w2, weights, ids))  # noqa: B023
        used = int(torch.unique(ids).numel())
        num_bytes = used * expert_bytes + 2 * x.numel() * x.element_size()
        rows.append({"shape": name, "tokens": tokens, "experts_used": used, "fused_us": round(fused * 1e6, 1),
                     "GB_per_s": round(num_bytes / fused / 1e9, 1),
                     "bandwidth_fraction": fraction(num_bytes / fused, peak),
                     "TFLOP_per_s": round(2 * 3 * tokens * top_k * hidden * inter / fused / 1e12, 1),
                     "loop_us": round(loop * 1e6, 1), "speedup_vs_loop": round(loop / fused, 2)})
    return rows

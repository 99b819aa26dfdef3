"""Timing of the GGUF GEMM op (GPU only): bandwidth of the llama.cpp blocks it streams, against the dense GEMM.

Each point multiplies a random [M, K] activation by a [N, K] matrix of random blocks of one ggml type (finite
scales) through `torch.ops.graphserve.gguf_gemm`, timed by replaying a CUDA graph, with enough copies of the
weights cycled that the L2 never holds them. The bytes counted are the blocks, the activations and the output.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from graphserve.benchmarks.attention_kernels import cuda_ceilings, time_graph
from graphserve.benchmarks.quant_kernels import _L2_BYTES, LLAMA3_8B_GEMMS
from graphserve.benchmarks.roofline import fraction
from graphserve.ops import gguf as gguf_ops


def random_blocks(type_name: str, n: int, k: int) -> torch.Tensor:
    """[n, row_bytes] uint8 of random blocks of `type_name` on the GPU, scales small and finite."""
    qtype = gguf_ops.GGML_TYPE_IDS[type_name]
    _, block, size = gguf_ops.GGML_TYPES[qtype]
    raw = torch.randint(0, 256, (n * k // block, size), dtype=torch.uint8, device="cuda")
    for offset in gguf_ops.FP16_FIELD_OFFSETS.get(type_name, ()):
        scale = (torch.rand(raw.shape[0], device="cuda") * 1e-3).half().view(torch.uint8).view(-1, 2)
        raw[:, offset:offset + 2] = scale
    return raw.view(n, -1)


def bench_gguf_gemm(type_name: str, name: str, k: int, n: int, batch_sizes: Sequence[int],
                    dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per batch size: µs per call, bytes read / time as GB/s and a fraction of the copy ceiling, and the
    dense `dtype` GEMM (cuBLAS) of the same shape."""
    qtype = gguf_ops.GGML_TYPE_IDS[type_name]
    weight_bytes = n * gguf_ops.row_bytes(qtype, k)
    weights = [random_blocks(type_name, n, k) for _ in range(max(2, -(-2 * _L2_BYTES // weight_bytes)))]
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(max(2, -(-2 * _L2_BYTES // (2 * k * n))))]
    peak = getattr(cuda_ceilings(), "bytes_per_s", None)
    rows = []
    for m in batch_sizes:
        seconds, dense_seconds = _time_point(m, k, n, qtype, dtype, weights, dense)
        num_bytes = weight_bytes + (m * k + m * n) * torch.empty((), dtype=dtype).element_size()
        rows.append({
            "type": type_name, "gemm": name, "M": m, "K": k, "N": n, "us": round(seconds * 1e6, 2),
            "GB_per_s": round(num_bytes / seconds / 1e9, 1), "bandwidth_fraction": fraction(num_bytes / seconds, peak),
            "dense_us": round(dense_seconds * 1e6, 2), "speedup_vs_dense": round(dense_seconds / seconds, 2),
        })
    return rows


def _time_point(m: int, k: int, n: int, qtype: int, dtype: torch.dtype, weights: list[torch.Tensor],
                dense: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds per GGUF GEMM, seconds per dense GEMM) of an [m, k] activation, weights cycled per call."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    turn = {"q": 0, "d": 0}

    def call_gguf() -> None:
        torch.ops.graphserve.gguf_gemm(out, x, weights[turn["q"] % len(weights)], qtype)
        turn["q"] += 1

    def call_dense() -> None:
        torch.matmul(x, dense[turn["d"] % len(dense)].t(), out=out)
        turn["d"] += 1

    return time_graph(call_gguf), time_graph(call_dense)


def bench_llama8b(type_names: Sequence[str], batch_sizes: Sequence[int], dtype: torch.dtype) -> list[dict]:
    """Every Llama-3-8B projection in every type."""
    return [row for type_name in type_names for name, k, n in LLAMA3_8B_GEMMS
            for row in bench_gguf_gemm(type_name, name, k, n, batch_sizes, dtype)]

"""Timing of the quantized GEMM op (GPU only): bandwidth of the packed weights it streams, against the dense GEMM.

Each point multiplies a random [M, K] activation by a random packed [K, N] matrix of `bits`-bit codes with fp16
scales and zeros per group, through `torch.ops.graphserve.quant_gemm` (the kernel the platform registered), timed
by replaying a CUDA graph; several copies of the weights are cycled so that the L2 never holds them. The bytes
counted are what the GEMM must read: packed codes, scales, zeros and the activations, plus the output written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from graphserve.benchmarks.attention_kernels import cuda_ceilings, time_graph
from graphserve.benchmarks.roofline import fraction

# Llama-3-8B's projections as the engine runs them: (name, K, N) with q/k/v and gate/up fused.
LLAMA3_8B_GEMMS = (("qkv_proj", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 28672),
                   ("down_proj", 14336, 4096))
_L2_BYTES = 64 << 20


def _packed_weights(k: int, n: int, bits: int, group_size: int, copies: int) -> list[tuple[torch.Tensor, ...]]:
    groups = k // group_size
    return [(torch.randint(-(1 << 31), (1 << 31) - 1, (k * bits // 32, n), dtype=torch.int32, device="cuda"),
             (torch.rand(groups, n, device="cuda") * 0.01).half(),
             torch.randint(0, 1 << bits, (groups, n), device="cuda").half()) for _ in range(copies)]


def bench_quant_gemm(
    name: str, k: int, n: int, batch_sizes: Sequence[int], bits: int = 4, group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """One row per batch size: µs per call, bytes read / time as GB/s and a fraction of the copy ceiling, and the
    same product as a dense `dtype` GEMM (cuBLAS) for comparison."""
    group = k if group_size == -1 else group_size
    weight_bytes = k * n * bits // 8 + 2 * 2 * (k // group) * n
    copies = max(2, -(-2 * _L2_BYTES // weight_bytes))
    weights = _packed_weights(k, n, bits, group, copies)
    dense = [torch.randn(k, n, device="cuda", dtype=dtype) for _ in range(max(2, -(-2 * _L2_BYTES // (2 * k * n))))]
    peak = getattr(cuda_ceilings(), "bytes_per_s", None)
    rows = []
    for m in batch_sizes:
        seconds, dense_seconds = _time_point(m, k, n, bits, group, dtype, weights, dense)
        num_bytes = weight_bytes + (m * k + m * n) * torch.empty((), dtype=dtype).element_size()
        rows.append({
            "gemm": name, "M": m, "K": k, "N": n, "bits": bits, "group_size": group_size,
            "us": round(seconds * 1e6, 2), "GB_per_s": round(num_bytes / seconds / 1e9, 1),
            "bandwidth_fraction": fraction(num_bytes / seconds, peak),
            "dense_us": round(dense_seconds * 1e6, 2), "speedup_vs_dense": round(dense_seconds / seconds, 2),
        })
    return rows


def _time_point(m: int, k: int, n: int, bits: int, group: int, dtype: torch.dtype,
                weights: list[tuple[torch.Tensor, ...]], dense: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds per quantized GEMM, seconds per dense GEMM) of an [m, k] activation, weights cycled per call."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    turn = {"q": 0, "d": 0}

    def call_quant() -> None:
        qweight, scales, zeros = weights[turn["q"] % len(weights)]
        turn["q"] += 1
        torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, bits, group)

    def call_dense() -> None:
        torch.matmul(x, dense[turn["d"] % len(dense)], out=out)
        turn["d"] += 1

    return time_graph(call_quant), time_graph(call_dense)


def bench_decode_variants(
    variants: Sequence[tuple[int, int, int, int]], m: int = 1, bits: int = 4, group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Tile variants (BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused kernel at BLOCK_M = 16, on the four
    Llama-3-8B shapes: µs per call each, to choose `TILES` for decode batches."""
    import triton

    from graphserve.ops.triton.quant import _block_k, _quant_matmul_kernel

    rows = []
    for name, k, n in LLAMA3_8B_GEMMS:
        weight_bytes = k * n * bits // 8 + 4 * (k // group_size) * n
        weights = _packed_weights(k, n, bits, group_size, max(2, -(-2 * _L2_BYTES // weight_bytes)))
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.empty(m, n, device="cuda", dtype=dtype)
        for block_n, block_k, warps, stages in variants:
            turn = [0]

            def call(block_n: int = block_n, block_k: int = block_k, warps: int = warps, stages: int = stages,
                     turn: list = turn, x: torch.Tensor = x, out: torch.Tensor = out, k: int = k, n: int = n,
                     weights: list = weights) -> None:
                qweight, scales, zeros = weights[turn[0] % len(weights)]
                turn[0] += 1
                _quant_matmul_kernel[(triton.cdiv(m, 16), triton.cdiv(n, block_n))](
                    out, x, qweight, scales, zeros, m, n, k, out.stride(0), x.stride(0), qweight.stride(0),
                    scales.stride(0), BITS=bits, GROUP_SIZE=group_size, SQUEEZE=False, BLOCK_M=16, BLOCK_N=block_n,
                    BLOCK_K=_block_k(group_size, block_k), IEEE=False, num_warps=warps, num_stages=stages)

            seconds = time_graph(call)
            rows.append({"gemm": name, "M": m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps,
                         "num_stages": stages, "us": round(seconds * 1e6, 2),
                         "GB_per_s": round(weight_bytes / seconds / 1e9, 1)})
    return rows

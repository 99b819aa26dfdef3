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
from graphserve.ops._register import get_op

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


def parse_variants(spec: str) -> list[dict]:
    """"gemv:block_n=128,split_k=4;dot:block_m=16" -> [{"kernel": "gemv", "block_n": 128, "split_k": 4}, ...]."""
    variants = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kernel, _, fields = item.partition(":")
        variant = {"kernel": kernel.strip()}
        for field in filter(None, fields.split(",")):
            key, _, value = field.partition("=")
            variant[key.strip()] = int(value)
        variants.append(variant)
    return variants


def bench_variants(
    variants: Sequence[dict], batch_sizes: Sequence[int], bits: int = 4, group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Each launch variant (GemmConfig fields; split_k 0 or absent: the heuristic's) at each batch size on the four
    Llama-3-8B shapes: µs per call and the packed weights' bandwidth, to choose the launch heuristics."""
    from graphserve.ops.triton import quant as triton_quant

    rows = []
    for name, k, n in LLAMA3_8B_GEMMS:
        weight_bytes = k * n * bits // 8 + 4 * (k // group_size) * n
        weights = _packed_weights(k, n, bits, group_size, max(2, -(-2 * _L2_BYTES // weight_bytes)))
        for m in batch_sizes:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            out = torch.empty(m, n, device="cuda", dtype=dtype)
            heuristic = triton_quant.choose_config(m, n, k, bits, group_size, x.device)
            for variant in variants:
                if variant["kernel"] == "gemv" and m > 1:
                    continue
                fields = {key: value for key, value in variant.items() if not (key == "split_k" and value == 0)}
                if "split_k" not in fields and fields["kernel"] == heuristic.kernel:
                    fields["split_k"] = heuristic.split_k
                if fields["kernel"] == "dot":
                    fields["block_k"] = triton_quant.block_k_for(k, group_size, fields.get("block_k", 128))
                config = triton_quant.GemmConfig(**fields)
                turn = [0]

                def call(config=config, turn=turn, x=x, out=out, weights=weights) -> None:
                    qweight, scales, zeros = weights[turn[0] % len(weights)]
                    turn[0] += 1
                    triton_quant.launch(out, x, qweight, scales, zeros, bits, group_size, config)

                try:
                    seconds = time_graph(call)
                except Exception as exc:  # a variant the compiler refuses (too many registers, ...)
                    rows.append({"gemm": name, "M": m, **config.__dict__, "error": str(exc)[:200]})
                    continue
                qweight, scales, zeros = weights[0]
                triton_quant.launch(out, x, qweight, scales, zeros, bits, group_size, config)
                ref = torch.empty(m, n, device="cuda")
                get_op("quant_gemm").reference(ref, x, qweight, scales, zeros, bits, group_size)
                rows.append({"gemm": name, "M": m, **config.__dict__, "us": round(seconds * 1e6, 2),
                             "GB_per_s": round(weight_bytes / seconds / 1e9, 1),
                             "rel_err": float((out.float() - ref).norm() / ref.norm())})
    return rows

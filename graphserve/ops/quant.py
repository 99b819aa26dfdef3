"""Quantized GEMM ops: weight-only 2/4/8-bit with groups (AWQ and GPTQ, after repacking) and SqueezeLLM's LUT.

The engine's packed layout (graphserve/quantization/ converts every checkpoint format into it at load):
- `qweight` [K * bits / 32, N] int32: b-bit codes of Wt = W.T, packed sequentially along K (field i of word
  [r, n] is row 32/b * r + i);
- `scales`, `zeros` [K / group_size, N] (fp16 as checkpoints store them; zeros exact small integers):
  Wt[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n], computed in fp32;
- SqueezeLLM: `qweight` [K / 8, N] int32 of 4-bit indices, packed the same way, into `lookup_table` [N, 16]:
  Wt[k, n] = lookup_table[n, q[k, n]].

Each op writes a preallocated `out` and never syncs with the host (graph-safe). The torch references below are
the CPU implementation (dequantize in fp32, then one matmul) and the oracle of the Triton kernels.
"""
from __future__ import annotations

import torch

from graphserve.ops._register import register_op


def unpack_k(qweight: torch.Tensor, bits: int) -> torch.Tensor:  # [K * bits / 32, N] -> [K, N] int32
    """The codes of the engine's layout, one row per input index."""
    shift = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)  # [32 / bits]
    codes = (qweight.unsqueeze(1) >> shift.view(1, -1, 1)) & ((1 << bits) - 1)  # [K * bits / 32, 32 / bits, N]
    return codes.flatten(0, 1)


def dequantize_ref(
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [K, N] float32
    """Wt = (q - zero) * scale, per group of `group_size` input rows, in fp32."""
    codes = unpack_k(qweight, bits).float()
    return (codes - zeros.float().repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)


def _quant_dequantize_ref(
    out: torch.Tensor,  # [K, N]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> None:
    """out <- the dense Wt in out's dtype."""
    out.copy_(dequantize_ref(qweight, scales, zeros, bits, group_size))


def _quant_gemm_ref(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> None:
    """out <- x @ Wt, accumulated in fp32."""
    out.copy_(x.float() @ dequantize_ref(qweight, scales, zeros, bits, group_size))


def _squeezellm_gemm_ref(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / 8, N] int32, 4-bit indices
    lookup_table: torch.Tensor,  # [N, 16]
) -> None:
    """out <- x @ Wt with Wt[k, n] = lookup_table[n, q[k, n]], in fp32."""
    codes = unpack_k(qweight, 4).long()  # [K, N]
    wt = lookup_table.float().t().gather(0, codes)  # [16, N] gathered by row -> [K, N]
    out.copy_(x.float() @ wt)


register_op("quant_gemm", _quant_gemm_ref, mutates_args=("out",))
register_op("quant_dequantize", _quant_dequantize_ref, mutates_args=("out",))
register_op("squeezellm_gemm", _squeezellm_gemm_ref, mutates_args=("out",))


def quant_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ Wt of a weight-only quantized matrix."""
    out = torch.empty(x.shape[0], qweight.shape[1], dtype=x.dtype, device=x.device)
    torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, bits, group_size)
    return out


def quant_dequantize(
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [K, N]
    """The dense Wt (large batches: one dequantization, then a dense GEMM)."""
    out = torch.empty(qweight.shape[0] * 32 // bits, qweight.shape[1], dtype=dtype, device=qweight.device)
    torch.ops.graphserve.quant_dequantize(out, qweight, scales, zeros, bits, group_size)
    return out


def squeezellm_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / 8, N] int32
    lookup_table: torch.Tensor,  # [N, 16]
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ Wt of a SqueezeLLM (per-channel LUT) matrix."""
    out = torch.empty(x.shape[0], qweight.shape[1], dtype=x.dtype, device=x.device)
    torch.ops.graphserve.squeezellm_gemm(out, x, qweight, lookup_table)
    return out

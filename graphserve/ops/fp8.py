"""FP8 (e4m3) weights and activations: quantization helpers and the scaled GEMM op `graphserve::fp8_scaled_mm`.

Conventions (formats.md §4): a tensor is stored as `q = fp8(clamp(x / s, ±448))` and read as `x ≈ float(q) * s`.
Weights keep one fp32 scale per output channel (a per-tensor checkpoint scale fills its shard's rows, so fused
q/k/v and gate/up need no requantization); activations get one scale per token, computed each forward (dynamic)
or one static scalar from the checkpoint.

The op's torch reference (dequantize both, fp32 matmul) is the CPU implementation and the oracle; on CUDA GPUs with
FP8 tensor cores (compute capability >= 8.9) `fp8_scaled_mm_cublas` runs `torch._scaled_mm` (cuBLASLt) with row-wise
scales. Both write a preallocated output and never sync with the host (graph-safe).
"""
from __future__ import annotations

import torch

from graphserve.ops._register import register_op

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a positive scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(x / scale, ±448)) with `scale` broadcast against x (fp32 math, saturating, NaN-free)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_token_scales(x: torch.Tensor) -> torch.Tensor:  # [M, 1] fp32
    """Dynamic activation scales: max |x| of each row / 448."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(_MIN_SCALE)


def per_channel_scales(weight: torch.Tensor) -> torch.Tensor:  # [N] fp32
    """Weight scales: max |W| of each output row / 448."""
    return (weight.abs().amax(dim=-1).float() / FP8_MAX).clamp_min(_MIN_SCALE)


def _fp8_scaled_mm_ref(
    out: torch.Tensor,  # [M, N]
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [M, 1] or [1] fp32
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] fp32
) -> None:
    """out <- (float(x_q) * x_scale) @ (float(w_q) * w_scale[:, None])^T, in fp32."""
    x = x_q.float() * x_scale.float().reshape(-1, 1)
    w = w_q.float() * w_scale.float().reshape(-1, 1)
    out.copy_(x @ w.t())


register_op("fp8_scaled_mm", _fp8_scaled_mm_ref, mutates_args=("out",))


def fp8_scaled_mm_cublas(
    out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
) -> None:
    """cuBLASLt FP8 GEMM with row-wise scales ([M, 1] x [1, N]); cuBLASLt computes in bf16 output, then `out`."""
    m = x_q.shape[0]
    scale_a = x_scale.float().reshape(-1, 1)
    if scale_a.shape[0] != m:
        scale_a = scale_a.expand(m, 1).contiguous()
    result = torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=w_scale.float().reshape(1, -1),
                              out_dtype=torch.bfloat16)
    out.copy_(result)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:  # [..., N] in x's dtype
    """x @ W^T of an FP8 weight: x quantized per token (or with the static `input_scale`), then the scaled GEMM."""
    x2d = x.reshape(-1, x.shape[-1])
    x_scale = per_token_scales(x2d) if input_scale is None else input_scale.reshape(1)
    out = torch.empty(x2d.shape[0], w_q.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.graphserve.fp8_scaled_mm(out, quantize_fp8(x2d, x_scale), x_scale, w_q, w_scale)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], w_q.shape[0])

"""Triton RMSNorm kernels for `graphserve::rms_norm` and `graphserve::fused_add_rms_norm` (HF rounding).

One program normalizes one row held entirely in registers: the row is read once and written once, which is
all a memory-bound norm can do. The rounding points are those of the torch references (ops/layernorm.py):
the residual sum is rounded to the residual dtype before it is normalized, and the normalized row is rounded
to the input dtype before the weight multiplies it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from graphserve.ops._register import get_op

# One program keeps a whole row in registers; 64 k elements covers every hidden size in use (405B: 16 k).
MAX_HIDDEN_SIZE = 65536

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _normalize_row(s, w_ptr, offs, mask, hidden_size, eps, NORM_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr):
    """weight * (s * rsqrt(mean(s^2) + eps)).to(NORM_DTYPE), rounded to PROD_DTYPE; s is fp32 (0 past the row)."""
    var = tl.math.div_rn(tl.sum(s * s, axis=0), hidden_size * 1.0)
    # sqrt_rn + div_rn round like torch.rsqrt on the CPU (one correctly rounded sqrt, one division).
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    h = (s * rstd).to(NORM_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * h).to(PROD_DTYPE)


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_rows, hidden_size], rows stride_out apart
    x_ptr,  # [num_rows, hidden_size], rows stride_x apart
    w_ptr,  # [hidden_size]
    stride_out,
    stride_x,
    hidden_size,
    eps,
    NORM_DTYPE: tl.constexpr,
    PROD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[row] <- rmsnorm(x[row]) * weight."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    s = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    y = _normalize_row(s, w_ptr, offs, mask, hidden_size, eps, NORM_DTYPE, PROD_DTYPE)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,  # [num_rows, hidden_size], rows stride_x apart (input, then the normalized output)
    res_ptr,  # [num_rows, hidden_size], rows stride_res apart (residual in, x + residual out)
    w_ptr,  # [hidden_size]
    stride_x,
    stride_res,
    hidden_size,
    eps,
    NORM_DTYPE: tl.constexpr,
    PROD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """residual[row] <- x[row] + residual[row]; x[row] <- rmsnorm(residual[row]) * weight."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
    # The sum is rounded to the residual dtype and normalized from there, as HF's residual add does.
    s = (x + r).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_res + offs, s, mask=mask)
    y = _normalize_row(s.to(tl.float32), w_ptr, offs, mask, hidden_size, eps, NORM_DTYPE, PROD_DTYPE)
    tl.store(x_ptr + row * stride_x + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


def as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t [..., n] as a [num_rows, n] view of the same storage with unit stride inside a row, or None."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims that cannot collapse into one row stride
        return None


def run_on_rows(fn: Callable[..., None], *tensors: torch.Tensor) -> None:
    """Call fn on [num_rows, n] views of `tensors`; layouts without a row stride go through copies."""
    rows = [as_rows(t) for t in tensors]
    if all(r is not None for r in rows):
        fn(*rows)
        return
    copies = [t.contiguous() for t in tensors]
    fn(*[c.view(-1, c.shape[-1]) for c in copies])
    for t, c in zip(tensors, copies):
        if c.data_ptr() != t.data_ptr():
            t.copy_(c)


def _launch_config(hidden_size: int) -> tuple[int, int]:
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"Triton RMSNorm supports hidden sizes up to {MAX_HIDDEN_SIZE}, got {hidden_size}")
    block = triton.next_power_of_2(hidden_size)
    return block, min(max(block // 512, 1), 16)


def rms_norm(
    out: torch.Tensor,  # [..., hidden_size]
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """Triton `graphserve::rms_norm`: out <- rmsnorm(x) * weight."""
    hidden_size = x.shape[-1]
    block, num_warps = _launch_config(hidden_size)
    norm_dtype = _TL_DTYPES[x.dtype]
    prod_dtype = _TL_DTYPES[torch.promote_types(weight.dtype, x.dtype)]

    def launch(out2: torch.Tensor, x2: torch.Tensor) -> None:
        if x2.shape[0] == 0:
            return
        _rms_norm_kernel[(x2.shape[0],)](
            out2, x2, weight, out2.stride(0), x2.stride(0), hidden_size, eps,
            NORM_DTYPE=norm_dtype, PROD_DTYPE=prod_dtype, BLOCK=block, num_warps=num_warps,
        )

    run_on_rows(launch, out, x)


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    residual: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """Triton `graphserve::fused_add_rms_norm`: residual <- x + residual; x <- rmsnorm(residual) * weight."""
    hidden_size = x.shape[-1]
    block, num_warps = _launch_config(hidden_size)
    # The reference normalizes the residual, so its dtype sets the rounding of the normalized row.
    norm_dtype = _TL_DTYPES[residual.dtype]
    prod_dtype = _TL_DTYPES[torch.promote_types(weight.dtype, residual.dtype)]

    def launch(x2: torch.Tensor, res2: torch.Tensor) -> None:
        if x2.shape[0] == 0:
            return
        _fused_add_rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, x2.stride(0), res2.stride(0), hidden_size, eps,
            NORM_DTYPE=norm_dtype, PROD_DTYPE=prod_dtype, BLOCK=block, num_warps=num_warps,
        )

    run_on_rows(launch, x, residual)


def register_impls(kernels: dict[str, Callable[..., None]], dispatch_key: str) -> dict[str, str]:
    """Attach each kernel to its op on `dispatch_key` unless one is there already; {op_name: "triton"}."""
    for name, fn in kernels.items():
        op = get_op(name)
        if dispatch_key not in op.kernels:
            op.impl(dispatch_key, fn)
    return dict.fromkeys(kernels, "triton")


def register(dispatch_key: str) -> dict[str, str]:
    """Register the RMSNorm kernels on `dispatch_key`."""
    return register_impls({"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm}, dispatch_key)

"""Triton kernel for `graphserve::silu_and_mul`: out <- silu(gate) * up of a packed gate_up projection."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls, run_on_rows

# Columns per program: 1024 elements of two inputs and one output keep a program's loads wide without spilling.
BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_rows, d], rows stride_out apart
    x_ptr,  # [num_rows, 2 * d], rows stride_x apart: gate then up
    stride_out,
    stride_x,
    d,
    BLOCK: tl.constexpr,
):
    """out[row, cols] <- silu(x[row, cols]) * x[row, d + cols] for one block of columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to the input dtype before the product, as HF's act_fn(gate) * up is.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = (act * up).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    out: torch.Tensor,  # [..., d]
    x: torch.Tensor,  # [..., 2 * d]
) -> None:
    """Triton `graphserve::silu_and_mul`: write silu(gate) * up into `out`."""
    d = x.shape[-1] // 2

    def launch(out2: torch.Tensor, x2: torch.Tensor) -> None:
        if x2.shape[0] == 0 or d == 0:
            return
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, BLOCK))](
            out2, x2, out2.stride(0), x2.stride(0), d, BLOCK=BLOCK, num_warps=4,
        )

    run_on_rows(launch, out, x)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the SiLU-and-mul kernel on `dispatch_key`."""
    return register_impls({"silu_and_mul": silu_and_mul}, dispatch_key)

"""Pieces shared by the Triton attention kernels: launch facts, dtype flags and the zeroing of padded rows."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LOG2E_CONST = tl.constexpr(LOG2E)


def is_interpreter() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (CI), where bf16 arithmetic is wrong."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_inputs(dtype: torch.dtype) -> bool:
    """Convert loaded tiles to fp32 before any arithmetic: only needed for bf16 under the interpreter."""
    return dtype == torch.bfloat16 and is_interpreter()


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get exact (ieee) dots so fp32 results match the reference; half types keep the default.

    Not "tf32" for half types: it changes nothing there, and not every ROCm target accepts it.
    """
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def _device_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small fixed number on the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _device_num_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def _zero_padded_rows_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    row_begin,
    num_tokens,
    num_heads,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rows at or past query_start_loc[-1] (graph padding) get zeros; all other rows are left alone."""
    total = tl.load(query_start_loc_ptr + num_seqs)
    row0 = row_begin + tl.program_id(0) * BLOCK_T
    # Programs whose rows all hold real tokens (the common case) leave at once.
    if row0 + BLOCK_T > total:
        offs_d = tl.arange(0, HEAD_DIM_P2)
        for t in range(BLOCK_T):
            # A row index per lane: the interpreter mis-types (scalar bool & tensor bool) masks.
            row = row0 + t + tl.zeros([HEAD_DIM_P2], dtype=tl.int32)
            keep = (row >= total) & (row < num_tokens) & (offs_d < HEAD_DIM)
            for h in range(num_heads):
                ptrs = out_ptr + row.to(tl.int64) * stride_ot + h * stride_oh + offs_d * stride_od
                tl.store(ptrs, tl.zeros([HEAD_DIM_P2], dtype=out_ptr.dtype.element_ty), mask=keep)


def zero_padded_rows(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    row_begin: int = 0,
) -> None:
    """Zero `out[query_start_loc[-1]:]` without reading the device value on the host (graph-safe)."""
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens <= row_begin:
        return
    block_t = 16
    grid = (triton.cdiv(num_tokens - row_begin, block_t),)
    _zero_padded_rows_kernel[grid](
        out, query_start_loc, query_start_loc.shape[0] - 1, row_begin, num_tokens, num_heads,
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim), BLOCK_T=block_t,
    )


@triton.jit
def load_kv_tile(
    key_cache_ptr, value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_row_ptr,  # this sequence's row of the block table
    stride_btc,
    offs_n,  # [BLOCK_N] token positions in the sequence
    n_mask,  # [BLOCK_N] which positions exist (masked ones never touch the block table)
    offs_d,  # [HEAD_DIM_P2]
    kv_head,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    q_like,  # a tensor in the compute dtype: an FP8 tile is dequantized into it
    k_scale, v_scale,  # fp32 scalars (FP8 caches)
    KV_FP8: tl.constexpr,
):
    """Gather one tile of K and V ([BLOCK_N, HEAD_DIM_P2] each) through the block table (an FP8 cache's tile comes
    back as float(cache) * scale in the query's dtype)."""
    page = tl.load(block_table_row_ptr + (offs_n // BLOCK_SIZE) * stride_btc, mask=n_mask, other=0)
    # int64: page * stride overflows int32 on caches of more than 2^31 elements.
    page = page.to(tl.int64)
    in_page = offs_n % BLOCK_SIZE
    if HEAD_DIM == HEAD_DIM_P2:
        # A mask constant along head_dim keeps the loads vectorized.
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_ptrs = (key_cache_ptr + page[:, None] * stride_kb + in_page[:, None] * stride_ks
              + kv_head * stride_kh + offs_d[None, :] * stride_kd)
    v_ptrs = (value_cache_ptr + page[:, None] * stride_vb + in_page[:, None] * stride_vs
              + kv_head * stride_vh + offs_d[None, :] * stride_vd)
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    if KV_FP8:
        k = (k.to(tl.float32) * k_scale).to(q_like.dtype)
        v = (v.to(tl.float32) * v_scale).to(q_like.dtype)
    elif UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


def kv_scale_args(key_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale, KV_FP8) kernel arguments: the layer's scales for a 1-byte cache, dummies otherwise."""
    fp8 = key_cache.dtype.itemsize == 1
    if not fp8:
        return query, query, False
    if k_scale is None or v_scale is None:
        raise ValueError("an FP8 KV cache needs k_scale and v_scale")
    return k_scale, v_scale, True


@triton.jit
def online_softmax_step(
    q,  # [M, HEAD_DIM_P2] in the cache's dtype (fp32 when UPCAST)
    k, v,  # [BLOCK_N, HEAD_DIM_P2]
    visible,  # [M, BLOCK_N] bool (read only when MASKED)
    m_i, l_i,  # [M] running max (log2 domain) and running sum of exp2
    acc,  # [M, HEAD_DIM_P2] fp32, unnormalized
    scale_log2,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFT_CAP: tl.constexpr,  # > 0: scores become SOFT_CAP * tanh(score / SOFT_CAP) (Gemma 2)
    bias,  # [M, BLOCK_N] fp32 added to the scores in the log2 domain (read only when USE_BIAS: ALiBi)
    USE_BIAS: tl.constexpr,
):
    """One flash-attention step: scores of the tile, rescale of the running state, accumulation of P @ V."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if SOFT_CAP > 0:
        # tanh(x) = 2 * sigmoid(2x) - 1, on the natural-log scores, then back to the log2 domain
        natural = s * (1.0 / LOG2E_CONST)
        s = (SOFT_CAP * (2.0 * tl.sigmoid(natural * (2.0 / SOFT_CAP)) - 1.0)) * LOG2E_CONST
    if USE_BIAS:
        s = s + bias
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # m_i starts finite (-1e30, not -inf), so a row with nothing visible yet never computes inf - inf.
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc

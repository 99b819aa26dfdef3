"""Triton kernels of the batched multi-LoRA ops (`graphserve::lora_shrink`, `graphserve::lora_expand`).

SGMV-style grouped GEMMs over the sorted metadata of ops/lora.py, one launch per op. Grid axis 1 walks the L + 1
`lora_ids` entries; axis 0 the (row block, column block) tiles of one segment. Each program reads its slot and its
segment [start, end) of `sorted_token_ids` from the device metadata, gathers the rows
`sorted_token_ids[start + m * BLOCK_M + arange(BLOCK_M)]` (masked to the segment) and returns at once when its row
block lies past the segment's end (padding entries are empty segments, so most programs of a decode step stop after
two loads). Row blocks are sized for the whole step, not per segment: the grid depends on T only, and nothing is read
back on the host (graph-safe).
- shrink: slot -1 stores zeros in its rows of `buf`; otherwise buf[rows, cols] <- x[rows] @ A[slot, cols]^T, walking
  H_in in BLOCK_K steps with an fp32 accumulator (fp32 inputs: exact IEEE products, not TF32);
- expand: slot -1 returns; otherwise the column blocks of every slice are laid end to end on axis 0 (the slice
  offsets are constexprs, fixed per layer, S <= 3), and each tile adds buf[rows, slice's R columns] @
  B[slot, cols, :]^T to y in fp32. The buffer is rounded to the model dtype for the tensor-core dot (as in Punica
  and vLLM): a relative error of 2^-9 (bf16) on a term that is then added to y and rounded to bf16 anyway; fp32 models
  keep fp32 with IEEE products.

Decode uses BLOCK_M = 16 (tl.dot's minimum); larger steps 64. A first version: no split-K for the shrink (at decode
only (active slots) x (S * R / BLOCK_N) programs stream A), no per-segment block sizes, no autotuning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls

MAX_SLICES = 3


@triton.jit
def _segment_rows(sorted_ptr, start_ptr, z, pid_m, BLOCK_M: tl.constexpr):
    """The token rows of row block `pid_m` of segment `z`, their mask, and whether the block is empty."""
    start = tl.load(start_ptr + z)
    end = tl.load(start_ptr + z + 1)
    offs = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs < end
    rows = tl.load(sorted_ptr + offs, mask=mask, other=0).to(tl.int64)
    return rows, mask, start + pid_m * BLOCK_M >= end


@triton.jit
def _lora_shrink_kernel(
    buf_ptr,  # [T, N] float32, rows stride_bufm apart
    x_ptr,  # [T, K], rows stride_xm apart
    a_ptr,  # [L, N, K], unit stride along K
    sorted_ptr,  # [T] int32
    ids_ptr,  # [L + 1] int32
    start_ptr,  # [L + 2] int32
    N,  # S * R
    K,  # H_in
    stride_bufm,
    stride_xm,
    stride_al,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
):
    """buf[rows, n-tile] <- x[rows] @ A[slot, n-tile]^T for one row block of one slot's segment (zeros for -1)."""
    z = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    rows, mask_m, empty = _segment_rows(sorted_ptr, start_ptr, z, pid_m, BLOCK_M)
    if empty:
        return
    slot = tl.load(ids_ptr + z).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out_ptrs = buf_ptr + rows[:, None] * stride_bufm + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if slot < 0:
        tl.store(out_ptrs, acc, mask=out_mask)
        return
    a_base = a_ptr + slot * stride_al + offs_n[None, :].to(tl.int64) * stride_an
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        a = tl.load(a_base + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a.to(x.dtype))
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _pick(s, v0, v1, v2):
    """v0, v1 or v2 for slice index s (0, 1 or 2)."""
    return tl.where(s == 0, v0, tl.where(s == 1, v1, v2))


@triton.jit
def _lora_expand_kernel(
    y_ptr,  # [T, N], rows stride_ym apart
    buf_ptr,  # [T, S * R] float32, rows stride_bufm apart
    b_ptr,  # [L, N, R], unit stride along R
    sorted_ptr,  # [T] int32
    ids_ptr,  # [L + 1] int32
    start_ptr,  # [L + 2] int32
    R,
    stride_ym,
    stride_bufm,
    stride_bl,
    stride_bn,
    OFF1: tl.constexpr,  # slice s covers columns [OFF_s, OFF_{s+1}); OFF0 = 0, unused ones = N
    OFF2: tl.constexpr,
    OFF3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 model: fp32 dot with exact products
):
    """y[rows, n-tile] += buf[rows, slice's R columns] @ B[slot, n-tile]^T for one row block of one slot's segment."""
    NB0: tl.constexpr = (OFF1 + BLOCK_N - 1) // BLOCK_N
    NB1: tl.constexpr = (OFF2 - OFF1 + BLOCK_N - 1) // BLOCK_N
    NB2: tl.constexpr = (OFF3 - OFF2 + BLOCK_N - 1) // BLOCK_N
    z = tl.program_id(1)
    pid_m = tl.program_id(0) // (NB0 + NB1 + NB2)
    pid_n = tl.program_id(0) % (NB0 + NB1 + NB2)
    rows, mask_m, empty = _segment_rows(sorted_ptr, start_ptr, z, pid_m, BLOCK_M)
    if empty:
        return
    slot = tl.load(ids_ptr + z).to(tl.int64)
    if slot < 0:
        return
    # The slice this column block belongs to, and the block's columns inside it.
    s = (pid_n >= NB0).to(tl.int32) + (pid_n >= NB0 + NB1).to(tl.int32)
    lo = _pick(s, 0, OFF1, OFF2)
    hi = _pick(s, OFF1, OFF2, OFF3)
    offs_n = lo + (pid_n - _pick(s, 0, NB0, NB0 + NB1)) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        h = tl.load(buf_ptr + rows[:, None] * stride_bufm + s * R + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
        b = tl.load(b_ptr + slot * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None],
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        if IEEE:
            acc += tl.dot(h, b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(b_ptr.dtype.element_ty), b)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class LoRAConfig:
    """Tile sizes of one launch: `block_k` walks H_in (shrink) or the rank (expand)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


# Steps of at most this many tokens use 16-row blocks: decode batches spread over several slots fill little more.
SMALL_STEP_TOKENS = 256


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def shrink_config(num_tokens: int, width: int) -> LoRAConfig:
    """Tiles for a [num_tokens, H_in] x [H_in, width = S * R] shrink."""
    if num_tokens <= SMALL_STEP_TOKENS:
        return LoRAConfig(block_m=16, block_n=16, block_k=128)
    return LoRAConfig(block_m=64, block_n=min(64, _pow2_at_least_16(width)), block_k=64)


def expand_config(num_tokens: int, rank: int) -> LoRAConfig:
    """Tiles for a [num_tokens, R] x [R, N] expand per slice."""
    block_r = min(64, _pow2_at_least_16(rank))
    if num_tokens <= SMALL_STEP_TOKENS:
        return LoRAConfig(block_m=16, block_n=64, block_k=block_r)
    return LoRAConfig(block_m=64, block_n=128, block_k=block_r, num_warps=8)


def _check_meta(num_tokens: int, token_lora: torch.Tensor, sorted_token_ids: torch.Tensor,
                lora_ids: torch.Tensor, lora_token_start: torch.Tensor, num_slots: int) -> None:
    if token_lora.shape[0] != num_tokens or sorted_token_ids.shape[0] != num_tokens:
        raise ValueError(f"LoRA: token_lora / sorted_token_ids must have the step's {num_tokens} rows")
    if lora_ids.shape[0] != num_slots + 1 or lora_token_start.shape[0] != num_slots + 2:
        raise ValueError(f"LoRA: lora_ids / lora_token_start must have {num_slots + 1} / {num_slots + 2} entries")


def launch_shrink(buf: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, sorted_token_ids: torch.Tensor,
                  lora_ids: torch.Tensor, lora_token_start: torch.Tensor, config: LoRAConfig) -> None:
    """One shrink launch with the given tiles."""
    t, k = x.shape
    n = lora_a.shape[1]
    if t == 0 or n == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    lora_a = lora_a if lora_a.stride(2) == 1 else lora_a.contiguous()
    if buf.stride(1) != 1:
        raise ValueError("lora_shrink: buf must have unit column stride")
    grid = (triton.cdiv(t, config.block_m) * triton.cdiv(n, config.block_n), lora_ids.shape[0])
    _lora_shrink_kernel[grid](
        buf, x, lora_a, sorted_token_ids, lora_ids, lora_token_start, n, k,
        buf.stride(0), x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps,
    )


def launch_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, sorted_token_ids: torch.Tensor,
                  lora_ids: torch.Tensor, lora_token_start: torch.Tensor, slice_offsets: list[int],
                  config: LoRAConfig) -> None:
    """One expand launch with the given tiles."""
    t, n = y.shape
    rank = lora_b.shape[2]
    if t == 0 or n == 0:
        return
    if y.stride(1) != 1 or buf.stride(1) != 1:
        raise ValueError("lora_expand: y and buf must have unit column stride")
    lora_b = lora_b if lora_b.stride(2) == 1 else lora_b.contiguous()
    offsets = [int(o) for o in slice_offsets] + [n] * (MAX_SLICES + 1 - len(slice_offsets))
    blocks = sum(triton.cdiv(hi - lo, config.block_n) for lo, hi in zip(offsets, offsets[1:]))
    grid = (triton.cdiv(t, config.block_m) * blocks, lora_ids.shape[0])
    _lora_expand_kernel[grid](
        y, buf, lora_b, sorted_token_ids, lora_ids, lora_token_start, rank,
        y.stride(0), buf.stride(0), lora_b.stride(0), lora_b.stride(1),
        OFF1=offsets[1], OFF2=offsets[2], OFF3=offsets[3],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_k, IEEE=y.dtype == torch.float32,
        num_warps=config.num_warps,
    )


def lora_shrink(
    buf: torch.Tensor,  # [T, S * R] float32
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [L, S * R, H_in]
    token_lora: torch.Tensor,  # [T] int32
    sorted_token_ids: torch.Tensor,  # [T] int32
    lora_ids: torch.Tensor,  # [L + 1] int32
    lora_token_start: torch.Tensor,  # [L + 2] int32
) -> None:
    """Triton `graphserve::lora_shrink`."""
    _check_meta(x.shape[0], token_lora, sorted_token_ids, lora_ids, lora_token_start, lora_a.shape[0])
    launch_shrink(buf, x, lora_a, sorted_token_ids, lora_ids, lora_token_start,
                  shrink_config(x.shape[0], lora_a.shape[1]))


def lora_expand(
    y: torch.Tensor,  # [T, N]
    buf: torch.Tensor,  # [T, S * R] float32
    lora_b: torch.Tensor,  # [L, N, R]
    token_lora: torch.Tensor,  # [T] int32
    sorted_token_ids: torch.Tensor,  # [T] int32
    lora_ids: torch.Tensor,  # [L + 1] int32
    lora_token_start: torch.Tensor,  # [L + 2] int32
    slice_offsets: list[int],  # [S + 1], 0 first, N last
) -> None:
    """Triton `graphserve::lora_expand`."""
    _check_meta(y.shape[0], token_lora, sorted_token_ids, lora_ids, lora_token_start, lora_b.shape[0])
    slices = len(slice_offsets) - 1
    if not 1 <= slices <= MAX_SLICES or slice_offsets[0] != 0 or slice_offsets[-1] != y.shape[1]:
        raise ValueError(f"lora_expand: slice offsets {list(slice_offsets)} must run from 0 to N = {y.shape[1]} "
                         f"in at most {MAX_SLICES} slices")
    if buf.shape[1] != slices * lora_b.shape[2]:
        raise ValueError(f"lora_expand: buf has {buf.shape[1]} columns, expected {slices} x rank {lora_b.shape[2]}")
    launch_expand(y, buf, lora_b, sorted_token_ids, lora_ids, lora_token_start, slice_offsets,
                  expand_config(y.shape[0], lora_b.shape[2]))


def register(dispatch_key: str) -> dict[str, str]:
    """Register the multi-LoRA kernels on `dispatch_key`."""
    return register_impls({"lora_shrink": lora_shrink, "lora_expand": lora_expand}, dispatch_key)

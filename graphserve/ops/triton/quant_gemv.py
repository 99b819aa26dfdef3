"""Decode-shaped quantized GEMMs (a few rows): a GEMV kernel without tensor cores, and the split-K reduction that
the GEMV and the tiled kernel (ops/triton/quant.py) share.

Why a GEMV: at batch 1 the step streams the packed weights once, so the kernel must keep HBM busy while doing
about four instructions per 4-bit code. `tl.dot` would need the codes unpacked into an MMA operand layout (a trip
through shared memory per tile), and the int -> float conversion instruction runs at an eighth of the FMA rate;
both made the first kernel ALU-bound at 9-18 % of the bandwidth. Here each program keeps a [BLOCK_R, BLOCK_N] tile
of packed words in registers (BLOCK_N consecutive columns, so every row is one coalesced read), extracts field j
of every word with a shift and a mask, turns it into a float with the exponent trick (`code | 0x4B000000` read as
fp32 is 2^23 + code, exact), subtracts 2^23 + zero in one add and multiplies-adds the matching input element. A
tile never straddles two groups, so the scale is applied once per tile and output column.

Split-K: a K range per program along the grid's second axis, so that even N = 4096 fills the GPU. The partial sums
go to an fp32 workspace [SPLIT_K, M, N]; the last program of each output tile to finish (an atomic counter per
tile) adds them in split order, so the result does not depend on timing, and resets its counter. The counters live
in one zeroed buffer per device that stays zero between calls, so the reduction needs no memset and no extra
launch and is captured in CUDA graphs like any kernel (one GEMM at a time on a device: the engine's one stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The bits of 2^23 in fp32: a code below 2^23 ORed into them reads as the float 2^23 + code.
MAGIC = tl.constexpr(0x4B000000)
TWO_23 = tl.constexpr(8388608.0)
ONE = tl.constexpr(0x3F800000)  # the bits of 1.0 in fp32
LOCK_SLOTS = 1 << 16  # output tiles a split-K GEMM may have
_locks: dict[torch.device, torch.Tensor] = {}


@triton.jit
def write_output(out_ptr, ws_ptr, lock_ptr, part, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, pid_k, tile_id,
                 SPLIT_K: tl.constexpr):
    """out[offs_m, offs_n] <- part (SPLIT_K == 1), or the sum over the K splits of every program's part."""
    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, part.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptrs + pid_k.to(tl.int64) * M * N, part, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the tile's counter moves
        arrived = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split of this tile: add all partials in split order
            total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            for split in range(1, SPLIT_K):
                total += tl.load(ws_ptrs + split * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile_id, 0)  # ready for the next call


@triton.jit
def _load_step(qw_ptr, s_ptr, z_ptr, step, last, rows, offs_n, N, stride_qk, stride_sg, BITS: tl.constexpr,
               GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr):
    """The packed words [BLOCK_R, BLOCK_N] of one K step (as uint32) with its scale and zero rows (fp32); all
    zero past `last`."""
    PACK: tl.constexpr = 32 // BITS
    offs_r = step * BLOCK_R + tl.arange(0, BLOCK_R)
    n_live = tl.where(step < last, N, 0)
    mask_n = offs_n < n_live
    packed = tl.load(qw_ptr + offs_r[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                     mask=(offs_r[:, None] < rows) & mask_n[None, :], other=0).to(tl.uint32, bitcast=True)
    group = (step * BLOCK_R * PACK) // GROUP_SIZE
    scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return packed, scale, zero


@triton.jit
def _quant_gemv_kernel(
    out_ptr,  # [1, N]
    x_ptr,  # [1, K]
    qw_ptr,  # [K / PACK, N] int32 (PACK = 32 / BITS codes per word, sequential along K)
    s_ptr,  # [K / GROUP_SIZE, N] scales
    z_ptr,  # [K / GROUP_SIZE, N] zero points (exact integers)
    ws_ptr,  # [SPLIT_K, 1, N] fp32 partial sums (SPLIT_K > 1)
    lock_ptr,  # [>= cdiv(N, BLOCK_N)] int32 counters, zero between calls (SPLIT_K > 1)
    N,
    K,
    stride_qk,
    stride_sg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_R * PACK, or K (one group)
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # packed rows per step
    SPLIT_K: tl.constexpr,
):
    """out[0, n-tile] <- x @ dequant(W)[:, n-tile] over this program's share of K. Everything stays in the packed
    tile's 2-D layout (no layout conversion inside the loop)."""
    PACK: tl.constexpr = 32 // BITS
    TOP: tl.constexpr = 23 - BITS  # lowest bit of a code placed at the top of the mantissa
    TOP_MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = K // PACK
    steps = tl.cdiv(rows, BLOCK_R)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    # Register double-buffering: the next step's words are requested before this step's arithmetic, so every
    # warp keeps two tiles of loads in flight (the compiler pipelines only loads that feed tl.dot).
    packed, scale, zero = _load_step(qw_ptr, s_ptr, z_ptr, first, last, rows, offs_n, N, stride_qk, stride_sg,
                                     BITS, GROUP_SIZE, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        next_packed, next_scale, next_zero = _load_step(qw_ptr, s_ptr, z_ptr, step + 1, last, rows, offs_n, N,
                                                        stride_qk, stride_sg, BITS, GROUP_SIZE, BLOCK_R)
        offs_r = step * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rows
        dot = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # sum_j x_j * (1 + q_j / 2^BITS)
        x_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            # field j moved to the top of an fp32 mantissa under the exponent of 1.0: the float 1 + q / 2^BITS
            if TOP - BITS * j >= 0:
                field = packed << (TOP - BITS * j)
            else:
                field = packed >> (BITS * j - TOP)
            w = ((field & TOP_MASK) | ONE).to(tl.float32, bitcast=True)
            xj = tl.load(x_ptr + offs_r * PACK + j, mask=mask_r, other=0.0).to(tl.float32)  # [BLOCK_R]
            dot += xj[:, None] * w
            x_sum += xj
        # sum_j x_j (q_j - zero) = 2^BITS (dot - x_sum) - zero x_sum, times the group's scale
        acc += scale[None, :] * (dot * (1 << BITS) - (zero[None, :] + (1 << BITS)) * x_sum[:, None])
        packed, scale, zero = next_packed, next_scale, next_zero
    offs_m = tl.arange(0, 1)
    write_output(out_ptr, ws_ptr, lock_ptr, tl.sum(acc, axis=0)[None, :], offs_m, offs_n, offs_m < 1, mask_n, 1, N,
                 0, pid_k, pid_n, SPLIT_K)


def split_k_buffers(m: int, n: int, split_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace [split_k, m, n], the device's zeroed tile counters); dummies when split_k == 1."""
    lock = _locks.get(device)
    if lock is None:
        lock = _locks[device] = torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device)
    if split_k == 1:
        return lock, lock
    return torch.empty(split_k, m, n, dtype=torch.float32, device=device), lock


def gemv_steps(k: int, bits: int, group_size: int, block_r: int) -> tuple[int, int]:
    """(packed rows per step that keep a step inside one group, number of steps)."""
    pack = 32 // bits
    while block_r > 1 and group_size != k and group_size % (block_r * pack):
        block_r //= 2
    rows = k // pack
    return block_r, -(-rows // block_r)


def launch_gemv(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bits: int, group_size: int, block_n: int, block_r: int, split_k: int,
                num_warps: int) -> None:
    """Run the GEMV kernel with one tile configuration (split_k is capped at the number of K steps)."""
    m, k = x.shape
    n = out.shape[1]
    if m != 1:
        raise ValueError(f"the quantized GEMV kernel multiplies one row, not {m}")
    block_r, steps = gemv_steps(k, bits, group_size, block_r)
    split_k = max(1, min(split_k, steps))
    n_tiles = triton.cdiv(n, block_n)
    if split_k > 1 and n_tiles > LOCK_SLOTS:
        split_k = 1
    ws, lock = split_k_buffers(m, n, split_k, x.device)
    _quant_gemv_kernel[(n_tiles, split_k)](
        out, x, qweight, scales, zeros, ws, lock, n, k, qweight.stride(0), scales.stride(0),
        BITS=bits, GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_R=block_r, SPLIT_K=split_k, num_warps=num_warps,
    )

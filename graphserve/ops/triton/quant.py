"""Triton kernels of the quantized GEMM ops (`graphserve::quant_gemm`, `quant_dequantize`, `squeezellm_gemm`).

One tiled kernel dequantizes inside the GEMM: each program owns a BLOCK_M x BLOCK_N tile of the output and walks K
in BLOCK_K steps, loading BLOCK_K / (32 / bits) packed rows of `qweight` [*, BLOCK_N] (coalesced along N),
unpacking them with shifts into BLOCK_K rows, applying the tile's one scale / zero row (BLOCK_K divides the group
size, so a K-step never straddles two groups) and feeding `tl.dot` in the activation dtype with an fp32
accumulator. Small batches (decode, M <= 16) use BLOCK_M = 16 and narrow N tiles, so there are enough programs to
stream the weights from every SM; prefill steps use large tiles, and very large ones dequantize the matrix once
and call the dense GEMM. Everything is queued on the current stream without a host sync (graph-safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls

# Above this many rows, one dequantization plus the dense (cuBLAS) GEMM beats dequantizing in every M tile.
DENSE_GEMM_MIN_ROWS = 1024


@triton.jit
def _quant_matmul_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K]
    qw_ptr,  # [K / PACK, N] int32 (PACK = 32 / BITS codes per word, sequential along K)
    s_ptr,  # [K / GROUP_SIZE, N] scales (SQUEEZE: the [N, 16] lookup table)
    z_ptr,  # [K / GROUP_SIZE, N] zero points (unused with SQUEEZE)
    M,
    N,
    K,
    stride_om,
    stride_xm,
    stride_qk,
    stride_sg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SQUEEZE: tl.constexpr,  # codes index a per-column table of 16 values instead of (q - zero) * scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
):
    """out[m-tile, n-tile] <- x[m-tile, :] @ dequant(W)[:, n-tile]."""
    PACK: tl.constexpr = 32 // BITS
    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = tl.arange(0, PACK) * BITS  # [PACK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        offs_r = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        packed = tl.load(qw_ptr + offs_r[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=(offs_r[:, None] < K // PACK) & mask_n[None, :], other=0)
        codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BLOCK_K / PACK, PACK, N]
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        if SQUEEZE:
            w = tl.load(s_ptr + offs_n[None, :].to(tl.int64) * 16 + codes, mask=mask_n[None, :], other=0.0)
            w = w.to(tl.float32)
        elif TILE_GROUPS == 1:  # the K step lies inside one group: one scale / zero row
            group = k0 // GROUP_SIZE
            s = tl.load(s_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = (codes.to(tl.float32) - z[None, :]) * s[None, :]
        else:  # the K step spans TILE_GROUPS whole groups
            groups = k0 // GROUP_SIZE + tl.arange(0, TILE_GROUPS)
            g_mask = (groups[:, None] < K // GROUP_SIZE) & mask_n[None, :]
            g_offs = groups[:, None] * stride_sg + offs_n[None, :]
            s = tl.load(s_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)  # [TILE_GROUPS, N]
            z = tl.load(z_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
            w3 = tl.reshape(codes, (TILE_GROUPS, GROUP_SIZE, BLOCK_N)).to(tl.float32)
            w = tl.reshape((w3 - z[:, None, :]) * s[:, None, :], (BLOCK_K, BLOCK_N))
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(
    out_ptr,  # [K, N]
    qw_ptr,  # [K / PACK, N] int32
    s_ptr,  # [K / GROUP_SIZE, N]
    z_ptr,  # [K / GROUP_SIZE, N]
    N,
    K,
    stride_ok,
    stride_qk,
    stride_sg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[k-tile, n-tile] <- (q - zero) * scale."""
    PACK: tl.constexpr = 32 // BITS
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    packed = tl.load(qw_ptr + offs_r[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                     mask=(offs_r[:, None] < K // PACK) & mask_n[None, :], other=0)
    shifts = tl.arange(0, PACK) * BITS
    codes = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
    group = k0 // GROUP_SIZE
    s = tl.load(s_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = (codes.to(tl.float32) - z[None, :]) * s[None, :]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * stride_ok + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & mask_n[None, :])


def _block_k_in_group(group_size: int) -> int:
    """The largest power of two up to 128 dividing the group size (group sizes are multiples of 32)."""
    block = 128
    while group_size % block:
        block //= 2
    return block


def _block_k(group_size: int, preferred: int) -> int:
    """The matmul's K step: `preferred` when it is a whole number of groups, else one inside a group, so that a
    K step never holds part of a group."""
    if preferred > group_size and preferred % group_size == 0:
        return preferred
    return min(preferred, _block_k_in_group(group_size))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per batch size: decode streams the weights (narrow N tiles,
# long K steps, so many programs each keep several KB of loads in flight); larger batches reuse each weight tile.
# The decode tiles are the fastest of the variants timed on the H200 at Llama-3-8B's shapes
# (perf/results/h200/quant_ops_llama8b.txt): 16 x 256 up to N = 16k (qkv, o, down), 32 x 128 beyond (gate_up).
TILES = {16: (16, 16, 256, 4, 4), 64: (64, 64, 128, 4, 3), 1 << 30: (128, 128, 64, 8, 3)}
WIDE_DECODE_TILES = (16, 32, 128, 4, 4)
WIDE_N = 16384


def _tiles(m: int, n: int) -> tuple[int, int, int, int, int]:
    """The tile configuration for a batch of m rows and n output columns."""
    if m <= 16 and n >= WIDE_N:
        return WIDE_DECODE_TILES
    return next(tiles for limit, tiles in TILES.items() if m <= limit)


def _launch_matmul(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor,
                   zeros: torch.Tensor | None, bits: int, group_size: int) -> None:
    m, k = x.shape
    n = out.shape[1]
    if m == 0 or n == 0:
        return
    if qweight.stride(1) != 1 or table.stride(1) != 1 or (zeros is not None and zeros.stride() != table.stride()):
        raise ValueError("quantized GEMM: qweight, scales and zeros must be row-major (the loader makes them so)")
    block_m, block_n, block_k, warps, stages = _tiles(m, n)
    squeeze = zeros is None
    _quant_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        out, x, qweight, table, table if squeeze else zeros, m, n, k,
        out.stride(0), x.stride(0), qweight.stride(0), 0 if squeeze else table.stride(0),
        BITS=bits, GROUP_SIZE=group_size, SQUEEZE=squeeze, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=64 if squeeze else _block_k(group_size, block_k), IEEE=x.dtype == torch.float32, num_warps=warps,
        num_stages=stages,
    )


def quant_dequantize(
    out: torch.Tensor,  # [K, N]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> None:
    """Triton `graphserve::quant_dequantize`."""
    k, n = out.shape
    if k == 0 or n == 0:
        return
    block_k, block_n = _block_k_in_group(group_size), 64
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        out, qweight, scales, zeros, n, k, out.stride(0), qweight.stride(0), scales.stride(0),
        BITS=bits, GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


def quant_gemm(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    bits: int,
    group_size: int,
) -> None:
    """Triton `graphserve::quant_gemm`: fused for small and medium batches, dequantize + dense GEMM above."""
    x = x.contiguous()
    if x.shape[0] >= DENSE_GEMM_MIN_ROWS:
        dense = torch.empty(x.shape[1], out.shape[1], dtype=x.dtype, device=x.device)
        quant_dequantize(dense, qweight, scales, zeros, bits, group_size)
        torch.matmul(x, dense, out=out)
        return
    _launch_matmul(out, x, qweight, scales, zeros, bits, group_size)


def squeezellm_gemm(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / 8, N] int32
    lookup_table: torch.Tensor,  # [N, 16]
) -> None:
    """Triton `graphserve::squeezellm_gemm`: the codes index each column's table inside the GEMM."""
    # No groups: the K steps may end inside the input (the tail is masked).
    _launch_matmul(out, x.contiguous(), qweight, lookup_table.contiguous(), None, 4, 64)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the quantized GEMM kernels on `dispatch_key`."""
    return register_impls({"quant_gemm": quant_gemm, "quant_dequantize": quant_dequantize,
                           "squeezellm_gemm": squeezellm_gemm}, dispatch_key)

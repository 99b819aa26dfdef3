"""Triton kernels of the quantized GEMM ops (`graphserve::quant_gemm`, `quant_dequantize`, `squeezellm_gemm`).

Three paths by batch size, chosen per call by `choose_config`:
- one row (batch-1 decode): the GEMV kernel of ops/triton/quant_gemv.py, split along K so every SM streams;
- medium batches: a tiled kernel; each program owns a BLOCK_M x BLOCK_N output tile and walks (its share of) K in
  BLOCK_K steps that never straddle a group, loading each packed word once and splitting it into its codes; codes
  become floats by the exponent trick (exact, no int -> float instruction), get the tile's one scale / zero row
  and feed `tl.dot` in the activation dtype with an fp32 accumulator; split along K (a deterministic in-kernel
  reduction, ops/triton/quant_gemv.py) while the output tiles alone would leave SMs idle;
- very large batches (prefill): one dequantization of the matrix, then the dense GEMM.
Everything is queued on the current stream without a host sync (graph-safe).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls
from graphserve.ops.triton.quant_gemv import (
    LOCK_SLOTS,
    MAGIC,
    TWO_23,
    gemv_steps,
    launch_gemv,
    split_k_buffers,
    write_output,
)

# Above this many rows, one dequantization plus the dense (cuBLAS) GEMM beats dequantizing in every M tile.
DENSE_GEMM_MIN_ROWS = 1024


@triton.jit
def _quant_matmul_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K]
    qw_ptr,  # [K / PACK, N] int32 (PACK = 32 / BITS codes per word, sequential along K)
    s_ptr,  # [K / GROUP_SIZE, N] scales (SQUEEZE: the [N, 16] lookup table)
    z_ptr,  # [K / GROUP_SIZE, N] zero points, exact integers (unused with SQUEEZE)
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial sums (SPLIT_K > 1)
    lock_ptr,  # int32 tile counters, zero between calls (SPLIT_K > 1)
    M,
    N,
    K,
    stride_om,
    stride_xm,
    stride_qk,
    stride_sg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_K, or K (one group); SQUEEZE: unused
    SQUEEZE: tl.constexpr,  # codes index a per-column table of 16 values instead of (q - zero) * scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
):
    """out[m-tile, n-tile] <- x[m-tile, :] @ dequant(W)[:, n-tile] (this program's share of K when split)."""
    PACK: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(pid_k * per_split, tl.minimum(pid_k * per_split + per_split, steps)):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Each packed word is loaded once (coalesced along N) and split into its PACK codes by a reshape. (Having
        # every row k load its own word instead avoids the reshape but stages each word PACK times in the
        # pipeline's shared memory: slower at every tile timed on the H200, quant_variants_dot.json.)
        offs_w = step * (BLOCK_K // PACK) + tl.arange(0, BLOCK_K // PACK)
        words = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                        mask=(offs_w[:, None] < K // PACK) & mask_n[None, :], other=0)
        shifts = tl.arange(0, PACK) * BITS
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & CODE_MASK, (BLOCK_K, BLOCK_N))
        if SQUEEZE:
            w = tl.load(s_ptr + offs_n[None, :].to(tl.int64) * 16 + codes, mask=mask_n[None, :], other=0.0)
            w = w.to(tl.float32)
        else:  # the K step lies inside one group: one scale / zero row
            group = (step * BLOCK_K) // GROUP_SIZE
            s = tl.load(s_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32) + TWO_23
            w = ((codes | MAGIC).to(tl.float32, bitcast=True) - z[None, :]) * s[None, :]
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
    write_output(out_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, pid_k,
                 pid_m * tl.num_programs(1) + pid_n, SPLIT_K)


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
    """out[k-tile, n-tile] <- (q - zero) * scale (exact in fp32)."""
    PACK: tl.constexpr = 32 // BITS
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    words = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                    mask=(offs_w[:, None] < K // PACK) & mask_n[None, :], other=0)
    shifts = tl.arange(0, PACK) * BITS
    codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
    group = k0 // GROUP_SIZE
    s = tl.load(s_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32) + TWO_23
    w = ((codes | MAGIC).to(tl.float32, bitcast=True) - z[None, :]) * s[None, :]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * stride_ok + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & mask_n[None, :])


def block_k_for(k: int, group_size: int, preferred: int) -> int:
    """The largest power of two up to `preferred` that keeps every K step inside one group (any step does when the
    whole input is one group), and at least 16 (tl.dot's minimum; group sizes are multiples of 32)."""
    if group_size == k:
        return preferred
    block = preferred
    while block > 16 and group_size % block:
        block //= 2
    return block


@dataclass(frozen=True)
class GemmConfig:
    """One launch of the quantized GEMM: the GEMV kernel (`block_r` packed rows per step, no tensor cores) or the
    tiled `tl.dot` kernel (`block_m` x `block_n` x `block_k`), both with `split_k` programs along K."""

    kernel: str  # "gemv" or "dot"
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    block_r: int = 16  # gemv
    block_m: int = 16  # dot
    block_k: int = 128  # dot
    num_stages: int = 3  # dot


# Batches of at most GEMV_MAX_ROWS rows (decode) run the GEMV; larger ones the tiled kernel, split along K while
# its tiles alone would leave SMs idle. Chosen from variants timed on the H200 at Llama-3-8B's shapes
# (perf/results/h200/quant_variants_*.json).
GEMV_MAX_ROWS = 1
GEMV_BLOCK_N, GEMV_BLOCK_R, GEMV_WARPS = 128, 16, 4
PROGRAMS_PER_SM = 4
# rows -> (block m, n, k, warps, stages)
TILES = {16: (16, 32, 128, 4, 4), 64: (64, 128, 64, 4, 4), 1 << 30: (128, 128, 64, 8, 3)}
SQUEEZE_TILES = {16: (16, 32, 64, 4, 4), **TILES}


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 8  # TRITON_INTERPRET on the CPU: any small number
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def _split_k(tiles: int, steps: int, sms: int, min_steps: int) -> int:
    """K splits that bring `tiles` output tiles up to PROGRAMS_PER_SM programs per SM, each keeping at least
    `min_steps` K steps."""
    want = max(1, (PROGRAMS_PER_SM * sms) // max(tiles, 1))
    return max(1, min(want, steps // min_steps, 16))


def choose_config(m: int, n: int, k: int, bits: int, group_size: int, device: torch.device) -> GemmConfig:
    """The launch for an [m, k] x [k, n] quantized GEMM on `device`."""
    sms = _num_sms(device.index if device.type == "cuda" else None)
    if m <= GEMV_MAX_ROWS:
        block_r, steps = gemv_steps(k, bits, group_size, GEMV_BLOCK_R)
        split = _split_k(triton.cdiv(n, GEMV_BLOCK_N), steps, sms, 2)
        return GemmConfig("gemv", GEMV_BLOCK_N, split, GEMV_WARPS, block_r=block_r)
    block_m, block_n, block_k, warps, stages = next(t for rows, t in TILES.items() if m <= rows)
    block_k = block_k_for(k, group_size, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split_k(tiles, triton.cdiv(k, block_k), sms, 8)
    return GemmConfig("dot", block_n, split, warps, block_m=block_m, block_k=block_k, num_stages=stages)


def launch(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor,
           zeros: torch.Tensor | None, bits: int, group_size: int, config: GemmConfig) -> None:
    """Run one configuration (zeros None: SqueezeLLM, `table` is the [N, 16] lookup table; tiled kernel only)."""
    m, k = x.shape
    n = out.shape[1]
    if m == 0 or n == 0:
        return
    if qweight.stride(1) != 1 or table.stride(1) != 1 or (zeros is not None and zeros.stride() != table.stride()):
        raise ValueError("quantized GEMM: qweight, scales and zeros must be row-major (the loader makes them so)")
    if config.kernel == "gemv":
        launch_gemv(out, x, qweight, table, zeros, bits, group_size, config.block_n, config.block_r,
                    config.split_k, config.num_warps)
        return
    squeeze = zeros is None
    m_tiles, n_tiles = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    split = config.split_k if m_tiles * n_tiles <= LOCK_SLOTS else 1
    ws, lock = split_k_buffers(m, n, split, x.device)
    _quant_matmul_kernel[(m_tiles, n_tiles, split)](
        out, x, qweight, table, table if squeeze else zeros, ws, lock, m, n, k,
        out.stride(0), x.stride(0), qweight.stride(0), 0 if squeeze else table.stride(0),
        BITS=bits, GROUP_SIZE=group_size, SQUEEZE=squeeze, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=split, IEEE=x.dtype == torch.float32, num_warps=config.num_warps,
        num_stages=config.num_stages,
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
    block_k, block_n = block_k_for(k, group_size, 64), 64
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        out, qweight, scales, zeros, n, k, out.stride(0), qweight.stride(0), scales.stride(0),
        BITS=bits, GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


_dense_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dense_scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One flat buffer per device and dtype for the dequantized matrix of the large-batch path, grown to the largest
    layer and kept. A fresh [K, N] tensor per GEMM made the caching allocator return and re-map hundreds of MB per
    layer once the KV cache filled the GPU (TTFT of a 1 k prompt 45 ms instead of 32 ms on the H200); kept, it is
    allocated during the start-up memory profile (a max_num_batched_tokens step) and the KV cache is sized around it.
    """
    key = (device, dtype)
    buffer = _dense_scratch.get(key)
    if buffer is None or buffer.numel() < numel:
        _dense_scratch.pop(key, None)
        buffer = _dense_scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


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
        dense = dense_scratch(x.shape[1] * out.shape[1], x.dtype, x.device)[: x.shape[1] * out.shape[1]]
        dense = dense.view(x.shape[1], out.shape[1])
        quant_dequantize(dense, qweight, scales, zeros, bits, group_size)
        torch.matmul(x, dense, out=out)
        return
    launch(out, x, qweight, scales, zeros, bits, group_size,
           choose_config(x.shape[0], out.shape[1], x.shape[1], bits, group_size, x.device))


def squeezellm_gemm(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / 8, N] int32
    lookup_table: torch.Tensor,  # [N, 16]
) -> None:
    """Triton `graphserve::squeezellm_gemm`: the codes index each column's table inside the GEMM."""
    # No groups (one table per column): the tiled kernel at any batch size, the K tail masked.
    m, k = x.shape
    block_m, block_n, block_k, warps, stages = next(t for rows, t in SQUEEZE_TILES.items() if m <= rows)
    launch(out, x.contiguous(), qweight, lookup_table.contiguous(), None, 4, k,
           GemmConfig("dot", block_n, 1, warps, block_m=block_m, block_k=block_k, num_stages=stages))


def register(dispatch_key: str) -> dict[str, str]:
    """Register the quantized GEMM kernels on `dispatch_key`."""
    return register_impls({"quant_gemm": quant_gemm, "quant_dequantize": quant_dequantize,
                           "squeezellm_gemm": squeezellm_gemm}, dispatch_key)

"""Triton kernels of `graphserve::gguf_gemm` and `graphserve::gguf_dequantize` (block layouts: ops/gguf.py).

Every weight of a [BLOCK_K, BLOCK_N] tile is decoded on its own from the bytes of its block (the block's fp16
scales are read as two bytes each: blocks are not aligned for wider loads), so one kernel body serves every ggml
type through the QTYPE constexpr and a tile may straddle blocks. The bytes of one weight row are consecutive, so a
tile's loads are coalesced along K; the repeated scale bytes of a block come from L1.

Decode-shaped batches (up to GEMV_MAX_ROWS rows) multiply-add without tensor cores, split along K so that even
narrow projections fill the GPU (the split-K reduction of ops/triton/quant_gemv.py); medium batches decode the tile
to x's dtype for `tl.dot`; from DENSE_GEMM_MIN_ROWS rows the matrix is dequantized once into a kept scratch buffer
and multiplied by cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.gguf import GGML_TYPES, row_bytes
from graphserve.ops.triton.layernorm import register_impls
from graphserve.ops.triton.quant import DENSE_GEMM_MIN_ROWS, _num_sms, _split_k, dense_scratch
from graphserve.ops.triton.quant_gemv import LOCK_SLOTS, split_k_buffers, write_output

GEMV_MAX_ROWS = 4
GEMV_BLOCK_N, GEMV_BLOCK_K = 32, 64
DOT_TILES = {16: (16, 64, 64), 64: (64, 64, 64), 1 << 30: (64, 128, 64)}  # rows -> (block m, n, k)


@triton.jit
def _u8(ptr, offs):
    return tl.load(ptr + offs).to(tl.int32)


@triton.jit
def _f16(ptr, offs):
    """The fp16 at byte offsets `offs` (two bytes, little-endian), as fp32."""
    bits = _u8(ptr, offs) | (_u8(ptr, offs + 1) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(ptr, base, sub):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) from the 12 bytes at base + 4."""
    j = sub % 4
    a = _u8(ptr, base + 4 + j)
    b = _u8(ptr, base + 8 + j)
    c = _u8(ptr, base + 12 + j)
    sc = tl.where(sub < 4, a & 63, (c & 15) | ((a >> 2) & 48))
    mn = tl.where(sub < 4, b & 63, (c >> 4) | ((b >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def decode_tile(w_ptr, offs_k, offs_n, mask, stride_wn, QTYPE: tl.constexpr, QK: tl.constexpr,
                TYPE_SIZE: tl.constexpr):
    """The fp32 weights W[offs_n, offs_k] as a [BLOCK_K, BLOCK_N] tile (zero where masked)."""
    k2 = offs_k[:, None]
    e = k2 % QK
    base = offs_n[None, :].to(tl.int64) * stride_wn + (k2 // QK) * TYPE_SIZE
    base = tl.where(mask, base, 0)  # masked lanes read the first byte: always in bounds
    if QTYPE == 0:  # F32
        bits = _u8(w_ptr, base) | (_u8(w_ptr, base + 1) << 8) | (_u8(w_ptr, base + 2) << 16)
        bits = bits | (_u8(w_ptr, base + 3) << 24)
        w = bits.to(tl.float32, bitcast=True)
    elif QTYPE == 1:  # F16
        w = _f16(w_ptr, base)
    elif QTYPE == 30:  # BF16: the top half of an fp32
        w = ((_u8(w_ptr, base) << 16) | (_u8(w_ptr, base + 1) << 24)).to(tl.float32, bitcast=True)
    elif QTYPE == 8:  # Q8_0
        q = _u8(w_ptr, base + 2 + e)
        w = (q - ((q >> 7) << 8)).to(tl.float32) * _f16(w_ptr, base)
    elif QTYPE == 2 or QTYPE == 3:  # Q4_0, Q4_1
        QS: tl.constexpr = 2 if QTYPE == 2 else 4
        q = ((_u8(w_ptr, base + QS + e % 16) >> (4 * (e // 16))) & 15).to(tl.float32)
        if QTYPE == 2:
            w = _f16(w_ptr, base) * (q - 8)
        else:
            w = _f16(w_ptr, base) * q + _f16(w_ptr, base + 2)
    elif QTYPE == 6 or QTYPE == 7:  # Q5_0, Q5_1
        QH: tl.constexpr = 2 if QTYPE == 6 else 4
        high = (_u8(w_ptr, base + QH + e // 8) >> (e % 8)) & 1
        q = (((_u8(w_ptr, base + QH + 4 + e % 16) >> (4 * (e // 16))) & 15) | (high << 4)).to(tl.float32)
        if QTYPE == 6:
            w = _f16(w_ptr, base) * (q - 16)
        else:
            w = _f16(w_ptr, base) * q + _f16(w_ptr, base + 2)
    elif QTYPE == 10:  # Q2_K
        sc = _u8(w_ptr, base + e // 16)
        q = ((_u8(w_ptr, base + 16 + (e // 128) * 32 + e % 32) >> (2 * ((e % 128) // 32))) & 3).to(tl.float32)
        w = (_f16(w_ptr, base + 80) * (sc & 15).to(tl.float32)) * q - _f16(w_ptr, base + 82) * (sc >> 4).to(tl.float32)
    elif QTYPE == 11:  # Q3_K
        i = e // 16
        low = (_u8(w_ptr, base + 96 + i % 8) >> (4 * (i // 8))) & 15
        high = (_u8(w_ptr, base + 104 + i % 4) >> (2 * (i // 4))) & 3
        sc = ((low | (high << 4)) - 32).to(tl.float32)
        q = (_u8(w_ptr, base + 32 + (e // 128) * 32 + e % 32) >> (2 * ((e % 128) // 32))) & 3
        hbit = (_u8(w_ptr, base + e % 32) >> (e // 32)) & 1
        w = (_f16(w_ptr, base + 108) * sc) * (q - 4 * (1 - hbit)).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
        sc, mn = _k_scale_min(w_ptr, base, e // 32)
        QS: tl.constexpr = 16 if QTYPE == 12 else 48
        q = (_u8(w_ptr, base + QS + (e // 64) * 32 + e % 32) >> (4 * ((e % 64) // 32))) & 15
        if QTYPE == 13:
            q = q | (((_u8(w_ptr, base + 16 + e % 32) >> (e // 32)) & 1) << 4)
        w = (_f16(w_ptr, base) * sc) * q.to(tl.float32) - _f16(w_ptr, base + 2) * mn
    else:  # Q6_K
        low = (_u8(w_ptr, base + (e // 128) * 64 + e % 64) >> (4 * ((e % 128) // 64))) & 15
        high = (_u8(w_ptr, base + 128 + (e // 128) * 32 + e % 32) >> (2 * ((e % 128) // 32))) & 3
        sc = _u8(w_ptr, base + 192 + e // 16)
        sc = (sc - ((sc >> 7) << 8)).to(tl.float32)
        w = (_f16(w_ptr, base + 208) * sc) * ((low | (high << 4)) - 32).to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gguf_gemm_kernel(out_ptr, x_ptr, w_ptr, ws_ptr, lock_ptr, M, N, K, stride_om, stride_xm, stride_wn,
                      QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                      IEEE: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * W[n, k]; program (m tile, n tile, K split)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = decode_tile(w_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :], stride_wn, QTYPE, QK, TYPE_SIZE)
        if USE_DOT and IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        elif USE_DOT:
            acc += tl.dot(x, w.to(x.dtype))
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    write_output(out_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, pid_k, tile_id,
                 SPLIT_K)


@triton.jit
def _gguf_dequantize_kernel(out_ptr, w_ptr, N, K, stride_on, stride_wn, QTYPE: tl.constexpr, QK: tl.constexpr,
                            TYPE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = W[n, k] in out's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    w = decode_tile(w_ptr, offs_k, offs_n, mask, stride_wn, QTYPE, QK, TYPE_SIZE)
    ptrs = out_ptr + offs_n[None, :].to(tl.int64) * stride_on + offs_k[:, None]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def _check(qweight: torch.Tensor, qtype: int, k: int) -> tuple[int, int]:
    if qweight.dtype != torch.uint8 or qweight.stride(1) != 1 or qweight.shape[1] != row_bytes(qtype, k):
        raise ValueError(f"gguf: qweight must be row-major uint8 [N, {row_bytes(qtype, k)}] for {k} inputs")
    _, block, size = GGML_TYPES[qtype]
    return block, size


def gguf_dequantize(out: torch.Tensor, qweight: torch.Tensor, qtype: int) -> None:
    """Triton `graphserve::gguf_dequantize`."""
    n, k = out.shape
    block, size = _check(qweight, qtype, k)
    if n == 0 or k == 0:
        return
    block_n, block_k = 32, 64
    _gguf_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        out, qweight, n, k, out.stride(0), qweight.stride(0), QTYPE=qtype, QK=block, TYPE_SIZE=size,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def gguf_gemm(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> None:
    """Triton `graphserve::gguf_gemm`: fused for small and medium batches, dequantize + dense GEMM above."""
    x = x.contiguous()
    m, k = x.shape
    n = out.shape[1]
    block, size = _check(qweight, qtype, k)
    if m == 0 or n == 0:
        return
    if m >= DENSE_GEMM_MIN_ROWS:
        dense = dense_scratch(n * k, x.dtype, x.device)[: n * k].view(n, k)
        gguf_dequantize(dense, qweight, qtype)
        torch.matmul(x, dense.t(), out=out)
        return
    sms = _num_sms(x.device.index if x.device.type == "cuda" else None)
    if m <= GEMV_MAX_ROWS:
        block_m, block_n, block_k, use_dot, warps = triton.next_power_of_2(m), GEMV_BLOCK_N, GEMV_BLOCK_K, False, 4
    else:
        (block_m, block_n, block_k), use_dot = next(t for rows, t in DOT_TILES.items() if m <= rows), True
        warps = 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split_k(tiles, triton.cdiv(k, block_k), sms, 4) if tiles <= LOCK_SLOTS else 1
    ws, lock = split_k_buffers(m, n, split, x.device)
    _gguf_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)](
        out, x, qweight, ws, lock, m, n, k, out.stride(0), x.stride(0), qweight.stride(0), QTYPE=qtype, QK=block,
        TYPE_SIZE=size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, USE_DOT=use_dot,
        IEEE=x.dtype == torch.float32, num_warps=warps)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the GGUF kernels on `dispatch_key`."""
    return register_impls({"gguf_gemm": gguf_gemm, "gguf_dequantize": gguf_dequantize}, dispatch_key)

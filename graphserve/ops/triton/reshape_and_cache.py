"""`reshape_and_cache` in Triton: scatter each new token's K/V into its paged-cache slot (slot < 0 skipped)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr, value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr, v_scale_ptr,  # [1] fp32 (FP8 caches)
    num_kv_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """One program per (token, tile of KV heads): copy its [BLOCK_H, head_dim] K and V rows into the cache."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token (graph bucket) or a token whose KV must not be written
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    kc = key_cache_ptr + block * stride_kcb + in_block * stride_kcs + offs_h[:, None] * stride_kch
    vc = value_cache_ptr + block * stride_vcb + in_block * stride_vcs + offs_h[:, None] * stride_vch
    if KV_FP8:  # saturate k / k_scale into the FP8 range
        k = tl.minimum(tl.maximum(k.to(tl.float32) / tl.load(k_scale_ptr), -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / tl.load(v_scale_ptr), -FP8_MAX), FP8_MAX)
    tl.store(kc + offs_d[None, :] * stride_kcd, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + offs_d[None, :] * stride_vcd, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    k_scale: torch.Tensor | None = None,  # [1] fp32 (FP8 caches)
    v_scale: torch.Tensor | None = None,
) -> None:
    """The device impl of `graphserve::reshape_and_cache` (no host sync: negative slots are skipped on device)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return
    head_dim_p2 = triton.next_power_of_2(head_dim)
    # About 4 KiB of K (and of V) per program: enough bytes in flight without idling on small head counts.
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // head_dim_p2))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    kv_fp8 = key_cache.dtype.itemsize == 1
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 KV cache needs k_scale and v_scale")
    fp8_max = torch.finfo(key_cache.dtype).max if kv_fp8 else 0.0
    _reshape_and_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, k_scale if kv_fp8 else key,
        v_scale if kv_fp8 else value, num_kv_heads,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, BLOCK_H=block_h, BLOCK_SIZE=key_cache.shape[1],
        KV_FP8=kv_fp8, FP8_MAX=fp8_max, num_warps=4,
    )


def register(dispatch_key: str) -> dict[str, str]:
    """Register the Triton cache write on `dispatch_key` (once)."""
    from graphserve.ops._register import get_op

    op = get_op("reshape_and_cache")
    if dispatch_key not in op.kernels:
        op.impl(dispatch_key, reshape_and_cache)
    return {"reshape_and_cache": "triton"}

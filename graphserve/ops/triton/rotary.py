"""Triton kernel for `graphserve::rotary_embedding`: RoPE in place on (possibly strided) query and key.

One program rotates every head of one token, query heads then key heads, reading that token's cos/sin row of
the cache once. Only the first rotary_dim dims of each head move; the rest of the head is never touched. The
math is fp32 and each result is rounded once to the tensor's dtype, as in the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls


@triton.jit
def _rotate_heads(
    base_ptr,  # this token's row: [num_heads, head_size] with unit stride inside a row
    num_heads,
    cos,  # [1, ROT_HALF_P2] fp32
    sin,  # [1, ROT_HALF_P2] fp32
    rot_mask,  # [1, ROT_HALF_P2]
    HEAD_SIZE: tl.constexpr,
    ROT_HALF: tl.constexpr,
    ROT_HALF_P2: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Rotate the (i, j) pairs of every head: NeoX pairs i with i + d/2, GPT-J pairs 2i with 2i + 1."""
    i = tl.arange(0, ROT_HALF_P2)[None, :]
    if IS_NEOX:
        first = i
        second = i + ROT_HALF
    else:
        first = 2 * i
        second = 2 * i + 1
    for h0 in range(0, num_heads, HEADS_BLOCK):
        heads = h0 + tl.arange(0, HEADS_BLOCK)[:, None]
        mask = (heads < num_heads) & rot_mask
        ptr = base_ptr + heads * HEAD_SIZE
        x1 = tl.load(ptr + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + second, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        tl.store(ptr + first, y1.to(base_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + second, y2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    positions_ptr,  # [num_tokens]
    q_ptr,  # [num_tokens, num_heads * head_size], rows stride_q apart
    k_ptr,  # [num_tokens, num_kv_heads * head_size], rows stride_k apart
    cache_ptr,  # [max_position, rotary_dim]: cos then sin, rows stride_cache apart
    stride_q,
    stride_k,
    stride_cache,
    num_heads,
    num_kv_heads,
    HEAD_SIZE: tl.constexpr,
    ROT_HALF: tl.constexpr,
    ROT_HALF_P2: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Rotate all query and key heads of token program_id(0) by its position."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, ROT_HALF_P2)[None, :]
    rot_mask = i < ROT_HALF
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=rot_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + ROT_HALF + i, mask=rot_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q, num_heads, cos, sin, rot_mask,
                  HEAD_SIZE, ROT_HALF, ROT_HALF_P2, HEADS_BLOCK, IS_NEOX)
    _rotate_heads(k_ptr + token * stride_k, num_kv_heads, cos, sin, rot_mask,
                  HEAD_SIZE, ROT_HALF, ROT_HALF_P2, HEADS_BLOCK, IS_NEOX)


def _token_rows(x: torch.Tensor, num_tokens: int, head_size: int) -> torch.Tensor:
    """x as [num_tokens, n] sharing storage with unit stride inside a token (q/k slices of qkv qualify)."""
    rows = x.view(num_tokens, -1)
    if rows.shape[1] % head_size != 0 or (rows.shape[1] > 1 and rows.stride(1) != 1):
        raise ValueError(f"rotary_embedding needs [num_tokens, num_heads * {head_size}] rows with unit "
                         f"inner stride, got shape {tuple(x.shape)} strides {x.stride()}")
    return rows


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    is_neox: bool,
) -> None:
    """Triton `graphserve::rotary_embedding`: rotate the first rotary_dim dims of every head in place."""
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return
    q = _token_rows(query, num_tokens, head_size)
    k = _token_rows(key, num_tokens, head_size)
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim > head_size or rotary_dim % 2 != 0 or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"bad cos_sin_cache {tuple(cos_sin_cache.shape)} for head_size {head_size}")
    num_heads, num_kv_heads = q.shape[1] // head_size, k.shape[1] // head_size
    rot_half = rotary_dim // 2
    rot_half_p2 = triton.next_power_of_2(rot_half)
    # A block of heads x pairs of about 2 k elements per load keeps registers low for any head count.
    heads_block = max(1, min(triton.next_power_of_2(max(num_heads, num_kv_heads)), 2048 // rot_half_p2))
    _rotary_embedding_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), k.stride(0), cos_sin_cache.stride(0),
        num_heads, num_kv_heads,
        HEAD_SIZE=head_size, ROT_HALF=rot_half, ROT_HALF_P2=rot_half_p2, HEADS_BLOCK=heads_block,
        IS_NEOX=is_neox, num_warps=4,
    )


def register(dispatch_key: str) -> dict[str, str]:
    """Register the rotary-embedding kernel on `dispatch_key`."""
    return register_impls({"rotary_embedding": rotary_embedding}, dispatch_key)

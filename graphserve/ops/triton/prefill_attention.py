"""Paged PREFILL / MIXED attention in Triton: varlen causal (bottom-right aligned) attention over the paged cache.

Each sequence's new tokens (a prompt, a chunk on top of a cached prefix, or a single decode token) attend to
their whole context, read through the block table: reshape_and_cache has already written the new K/V.
One program handles BLOCK_Q query tokens x all GROUP query heads of one KV head (BLOCK_M = BLOCK_Q * GROUP
rows, row r = token r // GROUP, head r % GROUP), so every KV tile is loaded once per KV head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton._attn_common import (
    LOG2E,
    LOG2E_CONST,
    dot_precision,
    is_interpreter,
    kv_scale_args,
    load_kv_tile,
    online_softmax_step,
    upcast_inputs,
    zero_padded_rows,
)


@triton.jit
def _paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr, value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    k_scale_ptr, v_scale_ptr,  # [1] fp32 (FP8 caches)
    alibi_ptr,  # [num_heads] fp32 ALiBi slopes (read only when USE_ALIBI)
    scale_log2, sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_btr, stride_btc,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr,
):
    """Flash attention of BLOCK_Q query tokens (all heads of one KV head) of one sequence over its context."""
    # Heaviest (last, longest-context) query blocks first: causal work grows with the block index.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    i0 = q_block * BLOCK_Q
    if i0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # tokens cached before this step's chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    tok = i0 + offs_m // GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    heads = kv_head * GROUP + offs_m % GROUP
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    row_off = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(query_ptr + row_off[:, None] + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = prefix + tok  # absolute position of each row's token
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=row_ok, other=0.0) * LOG2E_CONST

    # Keys some row can see: [lo, hi). Keys below `full_hi` are visible to every row (no mask needed).
    hi = prefix + tl.minimum(i0 + BLOCK_Q, q_len)
    if USE_WINDOW:
        lo = tl.maximum(prefix + i0 - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = lo
    else:
        lo = 0
        full_hi = (prefix + i0 + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_btr
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    for n0 in range(lo, full_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, stride_btc, offs_n, offs_n < full_hi, offs_d, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, UPCAST, q, k_scale, v_scale, KV_FP8,
        )
        bias = slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        m_i, l_i, acc = online_softmax_step(q, k, v, 0, m_i, l_i, acc, scale_log2, False, DOT_PRECISION,
                                            SOFT_CAP, bias, USE_ALIBI)
    for n0 in range(full_hi, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, stride_btc, offs_n, n_mask, offs_d, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, UPCAST, q, k_scale, v_scale, KV_FP8,
        )
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        bias = slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        m_i, l_i, acc = online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale_log2, True, DOT_PRECISION,
                                            SOFT_CAP, bias, USE_ALIBI)

    # Rows that are padding (past q_len or the last whole token group) have l = 0; they are not stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


# Prompts at least this long (max_query_len, a static int) get the larger head_dim-128 tiles.
LONG_PROMPT = 2048


def _default_tiles(head_dim_p2: int, group: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): H200-tuned tiles, or few small ones for the interpreter.

    head_dim 128 (perf/results/h200/attention_gpu_check.json): 64 x 64 tiles with 4 warps were best at a 1k
    prompt, 128 x 128 with 8 warps at 4k (339 vs 319 TFLOP/s); 128 rows with 4 warps spill registers.
    """
    rows = triton.next_power_of_2(group)  # a tile holds at least one token's grouped heads
    if is_interpreter():
        return max(16, rows), 16, 4, 1
    if head_dim_p2 <= 64:
        return max(128, rows), 64, 4, 3
    if head_dim_p2 <= 128:
        return (max(128, rows), 128, 8, 3) if max_query_len >= LONG_PROMPT else (max(64, rows), 64, 4, 3)
    return max(64, rows), 32, 8, 2


def paged_prefill_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int,
    max_query_len: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Varlen causal attention of a mixed batch (prompts, chunks, decodes); rows past query_start_loc[-1] zeroed.

    The keyword arguments override the tile heuristics (tests and tuning).
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    head_dim_p2 = triton.next_power_of_2(head_dim)
    d_block_m, d_block_n, d_warps, d_stages = _default_tiles(head_dim_p2, group, max_query_len)
    block_m = block_m or d_block_m
    if block_m < group:
        raise ValueError(f"block_m={block_m} must hold at least one token's {group} grouped heads")
    block_q = block_m // group
    if num_seqs > 0 and max_query_len > 0:
        grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
        k_scale, v_scale, kv_fp8 = kv_scale_args(key_cache, k_scale, v_scale, query)
        _paged_prefill_kernel[grid](
            out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale, v_scale,
            alibi_slopes if alibi_slopes is not None else k_scale, scale * LOG2E, sliding_window,
            *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
            GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
            BLOCK_SIZE=block_size, BLOCK_N=block_n or d_block_n,
            USE_WINDOW=sliding_window > 0, UPCAST=upcast_inputs(query.dtype),
            DOT_PRECISION=dot_precision(query.dtype), KV_FP8=kv_fp8, SOFT_CAP=float(logits_soft_cap),
            USE_ALIBI=alibi_slopes is not None, num_warps=num_warps or d_warps, num_stages=num_stages or d_stages,
        )
    zero_padded_rows(out, query_start_loc)

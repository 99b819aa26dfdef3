"""Paged DECODE attention in Triton (one query token per sequence), GQA-aware, with split-KV, and the op impl.

One program handles one (sequence, KV head, split): it loads each KV tile once for all the query heads that
share the KV head and scores them with one `tl.dot` (the group padded to 16 rows), instead of looping over
query heads on CUDA cores. Long contexts are cut into `num_splits` partitions (flash-decoding); each partition
writes its running max, exp-sum and unnormalized output, and a reduction kernel combines them.

CUDA-graph safety: the grid and every buffer size depend only on tensor shapes and the static ints
(`max_seq_len` is an upper bound, e.g. max_model_len under graphs); seq_lens, query_start_loc and the block
table are read on the device, and each sequence cuts its own context into the static number of splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton._attn_common import (
    LOG2E,
    dot_precision,
    load_kv_tile,
    num_sms,
    online_softmax_step,
    upcast_inputs,
    zero_padded_rows,
)
from graphserve.ops.triton.prefill_attention import paged_prefill_attention

# Split-KV heuristic, from the split sweep on the H200 (perf/results/h200/attention_gpu_check.json): the best
# split count gives about 4 programs per SM (batch 64 x 2k: 1 split; 16 x 2k: 4; 8 x 4k: 8), and splits of
# 128 tokens still paid at batch 1 (1 x 2k: 16 splits beat 8).
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 128
MAX_NUM_SPLITS = 64


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr, value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    part_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM] fp32 (unused when NUM_SPLITS == 1)
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32: running max, exp-sum
    scale_log2, sliding_window, num_seqs, num_tokens, num_heads,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_btr, stride_btc,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention of one sequence's single query over one partition of its context, for one KV head's group."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    heads = kv_head * GROUP + offs_g
    gd_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    total = tl.load(query_start_loc_ptr + num_seqs)
    if (split == 0) & (seq >= total) & (seq < num_tokens):
        # Row `seq` is graph padding (no sequence owns it): zero it here and save a launch.
        pad_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(pad_ptrs, tl.zeros([GROUP_P, HEAD_DIM_P2], dtype=out_ptr.dtype.element_ty), mask=gd_mask)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
    # Each sequence cuts its own (windowed) context into NUM_SPLITS tile-aligned parts: the grid stays static.
    part = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv_lo + split * part
    end = tl.minimum(start + part, seq_len)

    q_ptrs = query_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=gd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_P], -1e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P2], dtype=tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_btr
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, stride_btc, offs_n, n_mask, offs_d, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, UPCAST,
        )
        m_i, l_i, acc = online_softmax_step(
            q, k, v, n_mask[None, :], m_i, l_i, acc, scale_log2, True, DOT_PRECISION
        )

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        # Empty partitions (short sequences) store m = -1e30, l = 0, acc = 0: weight zero in the reduction.
        row = (seq * num_heads + heads) * NUM_SPLITS + split
        g_mask = offs_g < GROUP
        tl.store(part_ml_ptr + row, m_i, mask=g_mask)
        tl.store(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + row, l_i, mask=g_mask)
        p_ptrs = part_out_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=gd_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    part_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM] fp32
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32
    num_seqs, num_heads,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr, NUM_SPLITS_P2: tl.constexpr,
):
    """out = sum_p exp2(m_p - M) acc_p / sum_p exp2(m_p - M) l_p, with M = max_p m_p."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    offs_s = tl.arange(0, NUM_SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    s_mask = offs_s < NUM_SPLITS
    row = (seq * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + row, mask=s_mask, other=-1e30)
    l = tl.load(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + row, mask=s_mask, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.load(part_out_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    o_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Static split count: enough programs to fill the GPU, never splits shorter than MIN_TOKENS_PER_SPLIT."""
    programs = max(num_seqs * num_kv_heads, 1)
    # Rounded down: one more partial wave of programs costs more than it balances (64 x 2k: 1 split, not 2).
    wanted = max(PROGRAMS_PER_SM * num_sms(device) // programs, 1)
    longest = triton.cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return _prev_power_of_2(min(wanted, longest, MAX_NUM_SPLITS))


def _check_shapes(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.dim() != 3 or key_cache.dim() != 4 or out.shape != query.shape:
        raise ValueError(f"bad shapes: out {tuple(out.shape)}, query {tuple(query.shape)}, "
                         f"cache {tuple(key_cache.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.shape[3] != query.shape[2]:
        raise ValueError(f"key/value cache {tuple(key_cache.shape)}/{tuple(value_cache.shape)} "
                         f"do not match query {tuple(query.shape)}")
    if query.shape[1] % key_cache.shape[2] != 0:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of num_kv_heads {key_cache.shape[2]}")


def paged_decode_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int,
    max_seq_len: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Decode attention (every sequence has 0 or 1 query token); rows past query_start_loc[-1] are zeroed.

    The keyword arguments override the launch heuristics (tests and tuning).
    """
    _check_shapes(out, query, key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        zero_padded_rows(out, query_start_loc)
        return
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    head_dim_p2 = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = 64 if head_dim_p2 <= 128 else 32
    # Partial results exist only for the split path; their size depends on shapes and static ints only.
    part_out = query.new_empty((num_seqs, num_heads, num_splits, head_dim) if num_splits > 1 else (1,),
                               dtype=torch.float32)
    part_ml = query.new_empty((2, num_seqs, num_heads, num_splits) if num_splits > 1 else (1,),
                              dtype=torch.float32)
    launch = {} if num_warps is None else {"num_warps": num_warps}
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, part_out, part_ml,
        scale * LOG2E, sliding_window, num_seqs, num_tokens, num_heads,
        *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window > 0, UPCAST=upcast_inputs(key_cache.dtype),
        DOT_PRECISION=dot_precision(key_cache.dtype), **launch,
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out, query_start_loc, part_out, part_ml, num_seqs, num_heads, *out.stride(),
            HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
            NUM_SPLITS=num_splits, NUM_SPLITS_P2=triton.next_power_of_2(num_splits),
        )
    # The decode kernel zeroed padded rows below num_seqs; rows beyond exist only if num_tokens > num_seqs.
    zero_padded_rows(out, query_start_loc, row_begin=num_seqs)


def paged_attention(
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
    max_seq_len: int,
) -> None:
    """The device impl of `graphserve::paged_attention`: decode kernel for pure decode batches, else prefill."""
    if max_query_len <= 1:
        paged_decode_attention(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                               scale, sliding_window, max_seq_len)
    else:
        _check_shapes(out, query, key_cache, value_cache)
        paged_prefill_attention(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                                scale, sliding_window, max_query_len)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the Triton paged attention on `dispatch_key` (once)."""
    from graphserve.ops._register import get_op

    op = get_op("paged_attention")
    if dispatch_key not in op.kernels:
        op.impl(dispatch_key, paged_attention)
    return {"paged_attention": "triton"}

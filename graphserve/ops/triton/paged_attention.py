"""Paged DECODE attention in Triton (one query token per sequence), GQA-aware, with split-KV, and the op impl.

One program handles one (sequence, KV head, split): it loads each KV tile once for all the query heads that
share the KV head and scores them with one `tl.dot` (the group padded to 16 rows), instead of looping over
query heads on CUDA cores. Long contexts are cut into `num_splits` partitions (flash-decoding); each partition
writes its running max, exp-sum and unnormalized output, and the last partition of a (sequence, KV head) to
finish combines them: a per-(sequence, KV head) arrival counter, reset by that last program, replaces a second
kernel launch (about 3 us per layer, a tenth of a batch-1 step's attention time). A sequence whose context
fits one partition writes its output directly.

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
    LOG2E_CONST,
    dot_precision,
    kv_scale_args,
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
    counter_ptr,  # [>= num_seqs * num_kv_heads] int32, zero between launches: partitions finished so far
    k_scale_ptr, v_scale_ptr,  # [1] fp32 (FP8 caches)
    alibi_ptr,  # [num_heads] fp32 ALiBi slopes (read only when USE_ALIBI)
    scale_log2, sliding_window, num_seqs, num_tokens, num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_btr, stride_btc,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr,
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
    num_active = tl.cdiv(seq_len - kv_lo, part)  # partitions holding context; the others have nothing to do
    if split >= num_active:
        return
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
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    slopes = tl.zeros([GROUP_P], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=offs_g < GROUP, other=0.0) * LOG2E_CONST
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        bias = slopes[:, None] * (offs_n - (seq_len - 1)).to(tl.float32)[None, :]
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, stride_btc, offs_n, n_mask, offs_d, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, UPCAST, q, k_scale, v_scale, KV_FP8,
        )
        m_i, l_i, acc = online_softmax_step(
            q, k, v, n_mask[None, :], m_i, l_i, acc, scale_log2, True, DOT_PRECISION, SOFT_CAP, bias, USE_ALIBI
        )

    o_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    if num_active == 1:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        row = (seq * num_heads + heads) * NUM_SPLITS + split
        g_mask = offs_g < GROUP
        ml_half = num_seqs * num_heads * NUM_SPLITS
        tl.store(part_ml_ptr + row, m_i, mask=g_mask)
        tl.store(part_ml_ptr + ml_half + row, l_i, mask=g_mask)
        p_ptrs = part_out_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=gd_mask)
        # Every thread's stores precede the arrival (barrier), which releases them to the last program.
        tl.debug_barrier()
        c_ptr = counter_ptr + seq * num_kv_heads + kv_head
        arrived = tl.atomic_add(c_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == num_active - 1:
            # The last partition: out = sum_p exp2(m_p - M) acc_p / sum_p exp2(m_p - M) l_p (M = running max).
            base = (seq * num_heads + heads) * NUM_SPLITS
            m_tot = tl.full([GROUP_P], -1e30, dtype=tl.float32)
            l_tot = tl.zeros([GROUP_P], dtype=tl.float32)
            o_tot = tl.zeros([GROUP_P, HEAD_DIM_P2], dtype=tl.float32)
            for p in range(0, num_active):
                # .cg: read from L2, where the other programs' stores are, never from a stale L1 line.
                m_p = tl.load(part_ml_ptr + base + p, mask=g_mask, other=-1e30, cache_modifier=".cg")
                l_p = tl.load(part_ml_ptr + ml_half + base + p, mask=g_mask, other=0.0, cache_modifier=".cg")
                a_p = tl.load(part_out_ptr + (base + p).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                              mask=gd_mask, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_tot, m_p)
                alpha = tl.exp2(m_tot - m_new)
                beta = tl.exp2(m_p - m_new)
                l_tot = l_tot * alpha + l_p * beta
                o_tot = o_tot * alpha[:, None] + a_p * beta[:, None]
                m_tot = m_new
            tl.store(o_ptrs, (o_tot / l_tot[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
            tl.atomic_xchg(c_ptr, 0)  # ready for the next launch (the next layer, the next graph replay)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 1 << 16  # 256 KiB: 1024 sequences x 64 KV heads before the buffer ever grows


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed arrival counters (kernels leave them zero); allocated once, outside graph capture."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged decode attention: the arrival counters must be allocated before graph "
                               f"capture (need {n}); run the largest batch once first")
        counters = _COUNTERS[device] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return counters


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
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
    counters = _arrival_counters(query.device, num_seqs * num_kv_heads)
    k_scale, v_scale, kv_fp8 = kv_scale_args(key_cache, k_scale, v_scale, query)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, part_out, part_ml, counters,
        k_scale, v_scale, alibi_slopes if alibi_slopes is not None else k_scale, scale * LOG2E, sliding_window,
        num_seqs, num_tokens, num_heads, num_kv_heads,
        *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window > 0, UPCAST=upcast_inputs(query.dtype),
        DOT_PRECISION=dot_precision(query.dtype), KV_FP8=kv_fp8, SOFT_CAP=float(logits_soft_cap),
        USE_ALIBI=alibi_slopes is not None, **launch,
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> None:
    """The device impl of `graphserve::paged_attention`: decode kernel for pure decode batches, else prefill."""
    if max_query_len <= 1:
        paged_decode_attention(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                               scale, sliding_window, max_seq_len, k_scale, v_scale, logits_soft_cap, alibi_slopes)
    else:
        _check_shapes(out, query, key_cache, value_cache)
        paged_prefill_attention(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                                scale, sliding_window, max_query_len, k_scale, v_scale, logits_soft_cap,
                                alibi_slopes)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the Triton paged attention on `dispatch_key` (once)."""
    from graphserve.ops._register import get_op

    op = get_op("paged_attention")
    if dispatch_key not in op.kernels:
        op.impl(dispatch_key, paged_attention)
    return {"paged_attention": "triton"}

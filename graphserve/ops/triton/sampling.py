"""Triton kernels for the sampler's hot path: `graphserve::apply_penalties`, `graphserve::apply_sampling_filters`.

Penalties touch only the tokens a row has seen. A [B, V] int32 scratch is zeroed, one kernel counts each row's
output tokens into it (atomic add) and flags its prompt tokens (atomic or of bit 30), a second kernel walks the
same ids again and swaps each count back to 0: the one occurrence that gets the non-zero count penalizes that
token once, with the whole count. Nothing reads the [B, V] logits but the tokens that are penalized.

Filters never sort. Each row searches its thresholds over an order-preserving int32 key of its logits: the k-th
largest logit is the largest key c with count(key >= c) >= k, and the top-p cut is the largest key c with
mass(key >= c) >= p * (mass of the top-k set). A search pass counts (or sums the probability mass of) the row
against NUM_PIVOTS pivots at once, so each pass shrinks the key interval NUM_PIVOTS-fold and 32-bit keys need at
most ceil(32 / log2(NUM_PIVOTS)) passes. Thresholds found in the raw logits carry over to logits / temperature
because division by T > 0 is monotone; the final pass compares in temperature-scaled space, so ties are kept
exactly as the torch reference keeps them. Min-p (p_i >= min_p * p_max) is l_i - l_max >= log(min_p), which
the top-k / top-p masks do not change because they always keep the top token.

Kept sets equal the torch reference's (both keep every token tied with a top-k or top-p cut) except where float
rounding decides: a token whose cumulative mass sits within rounding of the top-p boundary, or whose
probability ratio sits within rounding of min_p.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls

PENALTY_BLOCK = 256
# 16 pivots, 1024-wide blocks, 8 warps and per-thread 2-D partial sums were the fastest of the filter-kernel
# variants timed on the H200 (perf/results/h200/elementwise_gpu_check.json).
FILTER_BLOCK = 1024
NUM_PIVOTS = 16


@triton.jit
def _count_tokens_kernel(
    counts_ptr,  # [B, V] int32 scratch, zeroed
    ids_ptr,  # [B, num_ids] token ids, right-padded with V
    stride_counts,
    stride_ids,
    num_ids,
    vocab_size,
    IS_PROMPT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """counts[row, t] += 1 per output occurrence of t, or |= 1 << 30 (the prompt flag) for a prompt token t."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < num_ids
    ids = tl.load(ids_ptr + row * stride_ids + offs, mask=in_row, other=vocab_size)
    valid = in_row & (ids >= 0) & (ids < vocab_size)
    ptrs = counts_ptr + row * stride_counts + ids
    if IS_PROMPT:
        tl.atomic_or(ptrs, 1 << 30, mask=valid)
    else:
        tl.atomic_add(ptrs, 1, mask=valid)


@triton.jit
def _penalize_tokens_kernel(
    logits_ptr,  # [B, V] float32
    counts_ptr,  # [B, V] int32 from _count_tokens_kernel; every touched entry is reset to 0
    ids_ptr,  # [B, num_ids] token ids, right-padded with V
    presence_ptr,  # [B] float32
    frequency_ptr,  # [B] float32
    repetition_ptr,  # [B] float32
    stride_logits,
    stride_counts,
    stride_ids,
    num_ids,
    vocab_size,
    APPLY_REPETITION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Penalize each distinct seen token once: the occurrence that swaps out its non-zero count applies it."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < num_ids
    ids = tl.load(ids_ptr + row * stride_ids + offs, mask=in_row, other=vocab_size)
    valid = in_row & (ids >= 0) & (ids < vocab_size)
    packed = tl.atomic_xchg(counts_ptr + row * stride_counts + ids, 0, mask=valid)
    claim = valid & (packed != 0)
    count = (packed & ((1 << 30) - 1)).to(tl.float32)
    ptrs = logits_ptr + row * stride_logits + ids
    logit = tl.load(ptrs, mask=claim, other=0.0)
    if APPLY_REPETITION:
        rep = tl.load(repetition_ptr + row)
        logit = tl.where(logit > 0, tl.math.div_rn(logit, rep), logit * rep)
    # Same operation order as the reference; the launch disables FMA contraction so the rounding matches too.
    logit = logit - tl.load(frequency_ptr + row) * count
    logit = logit - tl.load(presence_ptr + row) * tl.where(count > 0, 1.0, 0.0)
    tl.store(ptrs, logit, mask=claim)


def _launch_penalty_pass(kernel, ids: torch.Tensor, counts: torch.Tensor, *args, **kwargs) -> None:
    grid = (ids.shape[0], triton.cdiv(ids.shape[1], PENALTY_BLOCK))
    kernel[grid](*args, **kwargs, BLOCK=PENALTY_BLOCK, num_warps=4)


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32, penalized in place
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64, right-padded with V
    prompt_token_ids: torch.Tensor | None,  # [B, max_prompt_len] int64, right-padded with V; None: no repetition
    presence_penalties: torch.Tensor,  # [B] float32
    frequency_penalties: torch.Tensor,  # [B] float32
    repetition_penalties: torch.Tensor,  # [B] float32
) -> None:
    """Triton `graphserve::apply_penalties`: repetition (HF), frequency and presence (OpenAI), in place."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=logits.device)
    id_sets = [(output_token_ids, False)]
    if prompt_token_ids is not None:
        id_sets.append((prompt_token_ids, True))
    for ids, is_prompt in id_sets:
        _launch_penalty_pass(_count_tokens_kernel, ids, counts, counts, ids, counts.stride(0), ids.stride(0),
                             ids.shape[1], vocab_size, IS_PROMPT=is_prompt)
    for ids, _ in id_sets:
        _launch_penalty_pass(
            _penalize_tokens_kernel, ids, counts, logits, counts, ids, presence_penalties, frequency_penalties,
            repetition_penalties, logits.stride(0), counts.stride(0), ids.stride(0), ids.shape[1], vocab_size,
            APPLY_REPETITION=prompt_token_ids is not None, enable_fp_fusion=False,
        )


@triton.jit
def _to_key(x):
    """Order-preserving int32 key of fp32 x; -0.0 maps with +0.0 because they compare equal."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_key(key):
    """Inverse of _to_key."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _load_keys(row_ptr, start, vocab_size, BLOCK: tl.constexpr):
    """Keys and fp32 values of one block of a row; lanes past the row get key INT32_MIN (below every pivot)."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.where(mask, _to_key(x), -2147483648), x


@triton.jit
def _key_range(row_ptr, vocab_size, BLOCK: tl.constexpr):
    """(smallest key, largest key) of the row."""
    lo = tl.full([BLOCK], 2147483647, tl.int32)
    hi = tl.full([BLOCK], -2147483648, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        key, _ = _load_keys(row_ptr, start, vocab_size, BLOCK)
        lo = tl.minimum(lo, tl.where(start + tl.arange(0, BLOCK) < vocab_size, key, 2147483647))
        hi = tl.maximum(hi, key)
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _tally(row_ptr, vocab_size, pivots, temperature, l_max, USE_MASS: tl.constexpr, NUM_PIVOTS: tl.constexpr,
           BLOCK: tl.constexpr, ACC_2D: tl.constexpr):
    """Per pivot c: count(key >= c), or the unnormalized mass sum(exp(l - l_max)) over key >= c.

    The mass takes l = x / T and l - l_max rounded exactly as the torch reference does: a per-row scale folded
    into the exponent (exp2((x - x_max) * log2(e) / T)) would skew every row's head against its tail by the
    scale's rounding, enough to move the top-p cut by a token in about one row in two hundred at V = 128 k.

    ACC_2D keeps a [NUM_PIVOTS, BLOCK] partial sum per thread and reduces across threads once per pass
    instead of once per block (more registers, fewer shuffles).
    """
    acc = tl.zeros([NUM_PIVOTS], tl.float32)
    acc_2d = tl.zeros([NUM_PIVOTS, BLOCK], tl.float32)
    for start in range(0, vocab_size, BLOCK):
        key, x = _load_keys(row_ptr, start, vocab_size, BLOCK)
        above = key[None, :] >= pivots[:, None]  # [NUM_PIVOTS, BLOCK]
        if USE_MASS:
            contrib = tl.where(above, tl.exp(tl.math.div_rn(x, temperature) - l_max)[None, :], 0.0)
        else:
            contrib = above.to(tl.float32)
        if ACC_2D:
            acc_2d += contrib
        else:
            acc += tl.sum(contrib, axis=1)
    if ACC_2D:
        acc = tl.sum(acc_2d, axis=1)
    return acc


@triton.jit
def _search(row_ptr, vocab_size, lo, hi, p, temperature, l_max, target, USE_MASS: tl.constexpr,
            NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr, ACC_2D: tl.constexpr):
    """Largest key c in [lo, hi) with tally(c) >= target, given tally(lo) >= target > tally(hi).

    With USE_MASS, target < 0 means p times the mass at lo, read from the first pass (pivot 0 is lo).
    """
    steps = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    # int64 bounds: a key interval can span more than 2**31.
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    while hi - lo > 1:
        pivots = lo + (hi - lo) * steps // NUM_PIVOTS
        acc = _tally(row_ptr, vocab_size, pivots.to(tl.int32), temperature, l_max, USE_MASS, NUM_PIVOTS, BLOCK,
                     ACC_2D)
        if USE_MASS:
            first = p * tl.sum(tl.where(steps == 0, acc, 0.0), axis=0)
            target = tl.where(target < 0, first, target)
        ok = acc >= target
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots), axis=0)
    return lo.to(tl.int32)


@triton.jit
def _sampling_filters_kernel(
    out_ptr,  # [B, V] float32
    logits_ptr,  # [B, V]
    temperature_ptr,  # [B] float32
    top_k_ptr,  # [B] int64
    top_p_ptr,  # [B] float32
    min_p_ptr,  # [B] float32
    stride_out,
    stride_logits,
    vocab_size,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_2D: tl.constexpr,
):
    """out[row] <- logits[row] / T with -inf outside top-k, then outside the top-p nucleus, then below min-p."""
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * stride_logits
    dst = out_ptr + row * stride_out
    temperature = tl.load(temperature_ptr + row)
    # Scalars that a runtime branch may reassign must be typed tensors from the start.
    top_k = tl.full([], 0, tl.int32) + vocab_size
    top_p = tl.full([], 1.0, tl.float32)
    min_p = tl.full([], 0.0, tl.float32)
    if HAS_TOP_K:
        top_k = tl.load(top_k_ptr + row).to(tl.int32)
    if HAS_TOP_P:
        top_p = tl.load(top_p_ptr + row)
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row)
    threshold = tl.full([], float("-inf"), tl.float32)  # in temperature-scaled space
    log_min_p = tl.full([], float("-inf"), tl.float32)
    l_max = tl.full([], 0.0, tl.float32)
    if (top_k < vocab_size) | (top_p < 1.0) | (min_p > 0.0):
        lo, hi = _key_range(src, vocab_size, BLOCK)
        l_max = tl.math.div_rn(_from_key(hi), temperature)
        if top_k < vocab_size:
            lo = _search(src, vocab_size, lo, hi.to(tl.int64) + 1, 1.0, temperature, l_max, top_k.to(tl.float32),
                         False, NUM_PIVOTS, BLOCK, ACC_2D)
        if top_p < 1.0:
            lo = _search(src, vocab_size, lo, hi.to(tl.int64) + 1, top_p, temperature, l_max,
                         tl.full([], -1.0, tl.float32), True, NUM_PIVOTS, BLOCK, ACC_2D)
        threshold = tl.math.div_rn(_from_key(lo), temperature)
        if min_p > 0.0:
            log_min_p = tl.log(min_p)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab_size
        logit = tl.math.div_rn(tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), temperature)
        keep = (logit >= threshold) & (logit - l_max >= log_min_p)
        tl.store(dst + offs, tl.where(keep, logit, float("-inf")), mask=mask)


def apply_sampling_filters(
    out: torch.Tensor,  # [B, V] float32
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B] float32
    top_k: torch.Tensor | None,  # [B] int64 in [1, V]; V = off
    top_p: torch.Tensor | None,  # [B] float32 in (0, 1]; 1 = off
    min_p: torch.Tensor | None,  # [B] float32; 0 = off
    num_pivots: int = NUM_PIVOTS,
    num_warps: int = 8,
    accumulate_2d: bool = True,
    block: int = FILTER_BLOCK,
) -> None:
    """Triton `graphserve::apply_sampling_filters`: temperature, top-k, top-p and min-p without a sort."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    assert logits.stride(1) == 1 and out.stride(1) == 1, "logits rows must be contiguous"
    # Absent filters get a placeholder pointer; the HAS_* flags keep the kernel from reading it.
    _sampling_filters_kernel[(num_rows,)](
        out, logits, temperature,
        top_k if top_k is not None else temperature,
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        out.stride(0), logits.stride(0), vocab_size,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        NUM_PIVOTS=num_pivots, BLOCK=block, ACC_2D=accumulate_2d, num_warps=num_warps,
    )


def register(dispatch_key: str) -> dict[str, str]:
    """Register the penalty and filter kernels on `dispatch_key`."""
    return register_impls(
        {"apply_penalties": apply_penalties, "apply_sampling_filters": apply_sampling_filters}, dispatch_key
    )

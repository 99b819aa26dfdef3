"""Triton kernel of `graphserve::rejection_sample` (speculative decoding's verification, see ops/rejection_sampler.py).

One program per request (grid [B]), greedy and random requests in the same launch. A program walks its k drafts in
order and stops at the first rejection:
- greedy: each position reads its row of p in BLOCK_V blocks for argmax p_j (lowest index among ties, kept across
  blocks by a strict comparison) and accepts iff it equals d_j;
- random: three scalar loads, p_j(d_j), q_j(d_j) (1 without draft probabilities) and u_j; accept iff q > 0 and
  p / q >= u (division rounded to nearest, as torch does).
Accepted drafts are stored as they are decided. After the walk the program emits one token at column n_accepted:
the bonus when nothing was rejected, argmax p_j (already at hand) for a greedy rejection, or for a random one a
single pass over the rejected row of p (and q, and the request's noise) that keeps both the exponential race's
best argmax(residual / noise) over positive residuals and argmax p_j as the all-zero fallback. The columns after
it are set to -1. Nothing is read back on the host and the grid depends on B only (graph-safe).

Performance notes (a first version, correct first): a random request reads one [V] row of p, q and the noise at
most, where vLLM V1 computes a replacement for every position in a separate [B, max_spec_len] grid; a greedy
request reads up to k rows of p in one program, serially, where V1 takes a batched torch argmax over [T, V] first.
With k <= 4 and V ~ 128k that is ~0.5 M floats per greedy program. If greedy batches with long drafts become a
bottleneck, compute the argmax in a [T]-wide launch (or split V across programs) and pass it in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls

BLOCK_V = 1024
PLACEHOLDER_TOKEN_ID = tl.constexpr(-1)  # a constexpr: jitted code may read it


@triton.jit
def _row_argmax(row_ptr, vocab_size, BLOCK_V: tl.constexpr):
    """Index (int64) of the largest value of a [V] fp32 row, the lowest one among ties."""
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_idx = start + tl.argmax(x, axis=0, tie_break_left=True)
        better = block_max > best
        best_idx = tl.where(better, block_idx.to(tl.int64), best_idx)
        best = tl.where(better, block_max, best)
    return best_idx


@triton.jit
def _recover_token(p_row, q_row, noise_row, draft, vocab_size, HAS_DRAFT_PROBS: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """argmax(residual / noise) over the tokens with a positive residual max(0, p - q) (p with p[draft] = 0
    without draft probabilities); argmax p when the residual is zero everywhere."""
    best_score = tl.full([], -1.0, tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    p_best = tl.full([], float("-inf"), tl.float32)
    p_idx = tl.full([], 0, tl.int64)
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < vocab_size
        p = tl.load(p_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DRAFT_PROBS:
            q = tl.load(q_row + offs, mask=mask, other=0.0).to(tl.float32)
            residual = tl.maximum(p - q, 0.0)
        else:
            residual = tl.where(offs == draft, 0.0, p)
        noise = tl.load(noise_row + offs, mask=mask, other=1.0).to(tl.float32)
        positive = residual > 0.0
        score = tl.where(positive, tl.math.div_rn(residual, tl.where(positive, noise, 1.0)), -1.0)
        block_score = tl.max(score, axis=0)
        block_idx = start + tl.argmax(score, axis=0, tie_break_left=True)
        better = block_score > best_score
        best_idx = tl.where(better, block_idx.to(tl.int64), best_idx)
        best_score = tl.where(better, block_score, best_score)
        p_masked = tl.where(mask, p, float("-inf"))
        block_p = tl.max(p_masked, axis=0)
        block_p_idx = start + tl.argmax(p_masked, axis=0, tie_break_left=True)
        p_better = block_p > p_best
        p_idx = tl.where(p_better, block_p_idx.to(tl.int64), p_idx)
        p_best = tl.where(p_better, block_p, p_best)
    return tl.where(best_score > 0.0, best_idx, p_idx)


@triton.jit
def _rejection_sample_kernel(
    out_ptr,  # [B, S + 1] int64
    draft_ptr,  # [T] int64
    cu_ptr,  # [B] int32, inclusive cumsum of k_i
    q_ptr,  # [T, V] float32 (unused without draft probabilities)
    p_ptr,  # [T, V] float32
    bonus_ptr,  # [B] int64
    greedy_ptr,  # [B] bool
    uniform_ptr,  # [T] float32
    noise_ptr,  # [B, V] float32
    vocab_size,
    num_cols,  # S + 1
    stride_out,
    stride_q,
    stride_p,
    stride_noise,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_COLS: tl.constexpr,  # next power of two >= S + 1
):
    """One request: walk its drafts to the first rejection, then emit the replacement or the bonus and pad -1."""
    req = tl.program_id(0)
    end = tl.load(cu_ptr + req).to(tl.int64)
    start = tl.zeros([], tl.int64)
    if req > 0:
        start = tl.load(cu_ptr + req - 1).to(tl.int64)
    num_drafts = end - start
    greedy = tl.load(greedy_ptr + req).to(tl.int32)
    out_row = out_ptr + req.to(tl.int64) * stride_out
    # Walk the drafts; j ends at the number accepted, `replacement` holds argmax p_j of a greedy rejection.
    j = tl.zeros([], tl.int64)
    rejected = tl.zeros([], tl.int32)
    replacement = tl.full([], 0, tl.int64)
    while (j < num_drafts) & (rejected == 0):
        pos = start + j
        draft = tl.load(draft_ptr + pos).to(tl.int64)
        if greedy != 0:
            target = _row_argmax(p_ptr + pos * stride_p, vocab_size, BLOCK_V)
            accept = draft == target
        else:
            target = draft
            p_draft = tl.load(p_ptr + pos * stride_p + draft).to(tl.float32)
            q_draft = tl.full([], 1.0, tl.float32)
            if HAS_DRAFT_PROBS:
                q_draft = tl.load(q_ptr + pos * stride_q + draft).to(tl.float32)
            u = tl.load(uniform_ptr + pos).to(tl.float32)
            ratio = tl.math.div_rn(p_draft, tl.where(q_draft > 0.0, q_draft, 1.0))
            accept = (q_draft > 0.0) & (ratio >= u)
        if accept:
            tl.store(out_row + j, draft, mask=j < num_cols)
            j += 1
        else:
            rejected = tl.full([], 1, tl.int32)
            replacement = target
    # The emitted token at column j.
    token = tl.load(bonus_ptr + req).to(tl.int64)
    if rejected != 0:
        token = replacement
        if greedy == 0:
            pos = start + j
            draft = tl.load(draft_ptr + pos).to(tl.int64)
            token = _recover_token(p_ptr + pos * stride_p, q_ptr + pos * stride_q,
                                   noise_ptr + req.to(tl.int64) * stride_noise, draft, vocab_size,
                                   HAS_DRAFT_PROBS, BLOCK_V)
    tl.store(out_row + j, token, mask=j < num_cols)
    cols = tl.arange(0, BLOCK_COLS)
    tl.store(out_row + cols, tl.full([BLOCK_COLS], PLACEHOLDER_TOKEN_ID, tl.int64),
             mask=(cols > j) & (cols < num_cols))


def launch(out: torch.Tensor, draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
           draft_probs: torch.Tensor, target_probs: torch.Tensor, bonus_token_ids: torch.Tensor,
           is_greedy: torch.Tensor, uniform: torch.Tensor, recover_noise: torch.Tensor,
           block_v: int = BLOCK_V, num_warps: int = 4) -> None:
    """One launch with the given V block."""
    num_reqs, num_cols = out.shape
    num_tokens, vocab_size = target_probs.shape
    if num_reqs == 0:
        return
    if out.dtype != torch.int64 or out.stride(1) != 1:
        raise ValueError("rejection_sample: out must be int64 with unit column stride")
    if draft_token_ids.shape[0] != num_tokens or uniform.shape[0] != num_tokens:
        raise ValueError(f"rejection_sample: draft_token_ids / uniform must have the {num_tokens} target rows")
    if draft_probs.shape[0] not in (0, num_tokens) or tuple(recover_noise.shape) != (num_reqs, vocab_size):
        raise ValueError("rejection_sample: draft_probs must be [T, V] or [0, V] and recover_noise [B, V]")
    has_draft_probs = draft_probs.shape[0] != 0
    target_probs = target_probs if target_probs.stride(1) == 1 else target_probs.contiguous()
    recover_noise = recover_noise if recover_noise.stride(1) == 1 else recover_noise.contiguous()
    if has_draft_probs:
        draft_probs = draft_probs if draft_probs.stride(1) == 1 else draft_probs.contiguous()
    q = draft_probs if has_draft_probs else target_probs  # a placeholder pointer the kernel never reads
    _rejection_sample_kernel[(num_reqs,)](
        out, draft_token_ids.contiguous(), cu_num_draft_tokens.contiguous(), q, target_probs,
        bonus_token_ids.contiguous(), is_greedy.contiguous(), uniform.contiguous(), recover_noise,
        vocab_size, num_cols, out.stride(0), q.stride(0), target_probs.stride(0), recover_noise.stride(0),
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_V=block_v, BLOCK_COLS=triton.next_power_of_2(num_cols),
        num_warps=num_warps,
    )


def rejection_sample(
    out: torch.Tensor,  # [B, max_spec_len + 1] int64
    draft_token_ids: torch.Tensor,  # [T] int64
    cu_num_draft_tokens: torch.Tensor,  # [B] int32
    draft_probs: torch.Tensor,  # [T, V] float32 or [0, V]
    target_probs: torch.Tensor,  # [T, V] float32
    bonus_token_ids: torch.Tensor,  # [B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [T] float32
    recover_noise: torch.Tensor,  # [B, V] float32
) -> None:
    """Triton `graphserve::rejection_sample`."""
    launch(out, draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, bonus_token_ids, is_greedy,
           uniform, recover_noise)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the rejection sampler kernel on `dispatch_key`."""
    return register_impls({"rejection_sample": rejection_sample}, dispatch_key)

"""Speculative decoding's verification step as an op: `rejection_sample` (Leviathan et al. 2023, vLLM V1 layout).

p = target, q = draft. A step verifies B requests; request i proposed k_i >= 0 draft tokens d_1..d_k, and the
target model scored its k_i + 1 positions. Inputs are flattened over the T = sum k_i draft positions:
- `draft_token_ids` [T] int64, request after request;
- `cu_num_draft_tokens` [B] int32: the inclusive cumulative sum of k_i (request i owns rows cu[i-1]:cu[i]);
- `draft_probs` [T, V] fp32 q_j, or an empty [0, V] tensor when the proposer has no probabilities (n-gram):
  q_j(d_j) = 1, so a draft is accepted with probability p_j(d_j) and the residual is p_j with p_j(d_j) zeroed;
- `target_probs` [T, V] fp32 p_j, already processed per request (penalties, bias, temperature, top-k/p, min-p,
  softmax): the op samples them as they are;
- `bonus_token_ids` [B] int64: the token each request gets when it accepts all its drafts, sampled by the caller
  from p_{k+1} with the normal sampler;
- `is_greedy` [B] bool; `uniform` [T] fp32 u_j ~ U[0, 1); `recover_noise` [B, V] fp32 Exp(1) noise, one vector per
  request shared by its positions. The caller draws all randomness, with per-request generators for seeded
  requests, so the op is deterministic in its inputs.

Per request, for j = 1..k: a greedy request accepts d_j iff d_j == argmax p_j; a random one iff q_j(d_j) > 0 and
p_j(d_j) / q_j(d_j) >= u_j. The first rejected position emits a replacement and ends the request's output: argmax
p_j for greedy requests, otherwise a draw from norm(max(0, p_j - q_j)) by the exponential race
argmax(residual / noise) over the tokens with a positive residual (no normalisation, no host sync); an all-zero
residual (q_j == p_j up to rounding) falls back to argmax p_j. If all k drafts are accepted, the bonus token is
emitted after them. `out` [B, max_spec_len + 1] int64 receives, per row, the accepted drafts, the emitted token,
then PLACEHOLDER_TOKEN_ID (-1) to the end. Every argmax takes the lowest index among ties.

Each output position is distributed exactly as p (Leviathan et al., Theorem 1); the acceptance rate at a position
is sum_x min(p(x), q(x)). Requires k_i <= max_spec_len (not checked: that would read cu on the host).

The op writes only `out`, never syncs and has no data-dependent shapes (graph-safe). The torch reference below
is vectorised over all positions and is the oracle of the Triton kernel (ops/triton/rejection_sampler.py).
"""
from __future__ import annotations

import torch

from graphserve.ops._register import register_op

PLACEHOLDER_TOKEN_ID = -1


def _recovered_tokens(
    draft_token_ids: torch.Tensor,  # [T] int64
    draft_probs: torch.Tensor,  # [T, V] or [0, V]
    target_probs: torch.Tensor,  # [T, V]
    noise: torch.Tensor,  # [T, V] the owning request's Exp(1) row
    target_argmax: torch.Tensor,  # [T] int64
) -> torch.Tensor:  # [T] int64
    """Per position, the replacement a random request emits if it rejects there: a draw from max(0, p - q) by the
    exponential race, or argmax p when that residual is all zero."""
    p = target_probs.float()
    if draft_probs.shape[0] == 0:
        residual = p.scatter(1, draft_token_ids.unsqueeze(1), 0.0)
    else:
        residual = (p - draft_probs.float()).clamp_min(0.0)
    score = torch.where(residual > 0, residual / noise, -1.0)
    best, token = score.max(dim=-1)
    return torch.where(best > 0, token, target_argmax)


def _rejection_sample_ref(
    out: torch.Tensor,  # [B, max_spec_len + 1] int64
    draft_token_ids: torch.Tensor,  # [T] int64
    cu_num_draft_tokens: torch.Tensor,  # [B] int32, inclusive cumsum of k_i
    draft_probs: torch.Tensor,  # [T, V] float32, or [0, V]: no draft probabilities (q(d_j) = 1)
    target_probs: torch.Tensor,  # [T, V] float32
    bonus_token_ids: torch.Tensor,  # [B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [T] float32 in [0, 1)
    recover_noise: torch.Tensor,  # [B, V] float32 Exp(1)
) -> None:
    """out <- per request the accepted drafts, then the recovered or bonus token, then -1 (module docstring)."""
    num_reqs, width = out.shape
    num_tokens = draft_token_ids.shape[0]
    device = out.device
    if num_reqs == 0:
        return
    if num_tokens == 0:  # no drafts anywhere: every request emits its bonus token
        out.fill_(PLACEHOLDER_TOKEN_ID)
        out[:, 0] = bonus_token_ids.to(out.dtype)
        return
    if draft_probs.shape[0] not in (0, num_tokens):
        raise ValueError(f"rejection_sample: draft_probs has {draft_probs.shape[0]} rows for {num_tokens} drafts")
    cu = cu_num_draft_tokens.long()
    starts = torch.cat([cu.new_zeros(1), cu[:-1]])
    num_drafts = cu - starts  # [B]
    # Owner request of each draft position, and the per-position decision and replacement.
    owner = torch.searchsorted(cu, torch.arange(num_tokens, device=device), right=True).clamp_max(num_reqs - 1)
    draft = draft_token_ids.long()
    target_argmax = target_probs.argmax(dim=-1)
    p_draft = target_probs.float().gather(1, draft.unsqueeze(1)).squeeze(1)
    if draft_probs.shape[0] == 0:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.float().gather(1, draft.unsqueeze(1)).squeeze(1)
    accept_random = (q_draft > 0) & (p_draft / torch.where(q_draft > 0, q_draft, 1.0) >= uniform.float())
    greedy = is_greedy[owner]
    accepted = torch.where(greedy, draft == target_argmax, accept_random)
    recovered = _recovered_tokens(draft, draft_probs, target_probs, recover_noise[owner].float(), target_argmax)
    replacement = torch.where(greedy, target_argmax, recovered)
    # Per request and output column j: the draft position start + j (clamped where j >= k_i).
    cols = torch.arange(width, device=device)
    in_drafts = cols.unsqueeze(0) < num_drafts.unsqueeze(1)  # [B, width]
    rows = (starts.unsqueeze(1) + cols.unsqueeze(0)).clamp(0, num_tokens - 1)
    leading = (accepted[rows] & in_drafts).long().cumprod(dim=1)
    num_accepted = leading.sum(dim=1, keepdim=True)  # [B, 1] accepted drafts before the first rejection
    rejected_somewhere = num_accepted < num_drafts.unsqueeze(1)
    emitted = torch.where(rejected_somewhere, replacement[rows].gather(1, num_accepted.clamp_max(width - 1)),
                          bonus_token_ids.long().unsqueeze(1))  # [B, 1]
    result = torch.where(cols < num_accepted, draft[rows], PLACEHOLDER_TOKEN_ID)
    result = torch.where(cols == num_accepted, emitted, result)
    out.copy_(result)


register_op("rejection_sample", _rejection_sample_ref, mutates_args=("out",))


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [T] int64
    cu_num_draft_tokens: torch.Tensor,  # [B] int32
    draft_probs: torch.Tensor | None,  # [T, V] float32; None: no draft probabilities (n-gram)
    target_probs: torch.Tensor,  # [T, V] float32
    bonus_token_ids: torch.Tensor,  # [B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [T] float32
    recover_noise: torch.Tensor,  # [B, V] float32
    max_spec_len: int,
) -> torch.Tensor:  # [B, max_spec_len + 1] int64
    """A new [B, max_spec_len + 1] int64 tensor of each request's output tokens, -1 past the last (no sync)."""
    if draft_probs is None:
        draft_probs = target_probs.new_empty((0, target_probs.shape[-1]))
    out = torch.empty(cu_num_draft_tokens.shape[0], max_spec_len + 1, dtype=torch.int64,
                      device=target_probs.device)
    torch.ops.graphserve.rejection_sample(out, draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs,
                                          bonus_token_ids, is_greedy, uniform, recover_noise)
    return out


def parse_output(out: torch.Tensor | list[list[int]], vocab_size: int) -> list[list[int]]:
    """Host side, after the step's copy: each request's emitted tokens, without the -1 placeholders (and without
    ids >= vocab_size, as vLLM drops them)."""
    rows = out.tolist() if isinstance(out, torch.Tensor) else out
    return [[token for token in row if 0 <= token < vocab_size] for row in rows]

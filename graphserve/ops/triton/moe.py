"""Triton kernel of `graphserve::fused_moe` (layout and definition: ops/moe.py).

The token-expert pairs are grouped by expert into blocks of BLOCK_M rows, each expert's run padded to a whole
block (the idea of vLLM's `moe_align_block_size`), with torch ops that never read a count on the host: the buffers
have their worst-case size (T * k + E * (BLOCK_M - 1) rows), so a step replays in a CUDA graph. Padding rows hold
the sentinel T * k and blocks past the last expert the sentinel expert E; the kernel skips both.

Then two grouped GEMMs, each program computing one [BLOCK_M, BLOCK_N] tile of one expert: gate/up for the pairs
(rows of the hidden states), SiLU-and-mul, down times the routing weight; finally each token sums its k rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from graphserve.ops.triton.layernorm import register_impls


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair ids [P], expert of each block [P / block_m]) for the flat pairs t * k + j of `topk_ids` [T, k];
    P = T * k + E * (block_m - 1) rounded up to block_m. Graph-safe: no host sync."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    size = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((size,), num_pairs, dtype=torch.int64, device=flat.device)
    sorted_ids.scatter_(0, starts[expert_of] + rank, order)
    block_starts = torch.arange(0, size, block_m, device=flat.device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True)  # E past the last expert's blocks
    return sorted_ids, expert_ids


@triton.jit
def _moe_gemm_kernel(out_ptr, a_ptr, w_ptr, sorted_ids_ptr, expert_ids_ptr, weights_ptr, num_pairs, num_experts,
                     N, K, stride_am, stride_we, stride_wn, stride_om, A_ROW_DIV: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     IEEE: tl.constexpr):
    """out[pair, n] = a[pair // A_ROW_DIV] . w[expert, n] (times the pair's routing weight) for one block's pairs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = tl.where(valid, pairs // A_ROW_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_base + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: small for decode (few pairs per expert), larger once experts get many tokens."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _grouped_gemm(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                  expert_ids: torch.Tensor, weights: torch.Tensor | None, num_pairs: int, a_row_div: int,
                  block_m: int) -> None:
    n, k = w.shape[1], w.shape[2]
    block_n, block_k = 64, 64 if a.dtype != torch.float32 else 32
    grid = (expert_ids.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        out, a, w, sorted_ids, expert_ids, weights if weights is not None else out, num_pairs, w.shape[0], n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), A_ROW_DIV=a_row_div, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=a.dtype == torch.float32, num_warps=4,
    )


def fused_moe(out: torch.Tensor, hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Triton `graphserve::fused_moe`."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe: expert weights must be contiguous along the input dim")
    hidden_states = hidden_states.contiguous()
    num_experts, num_pairs = w13.shape[0], num_tokens * top_k
    block_m = _block_m(num_pairs, num_experts)
    sorted_ids, expert_ids = moe_align_block_size(topk_ids, num_experts, block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm(gate_up, hidden_states, w13, sorted_ids, expert_ids, None, num_pairs, top_k, block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    activated = (F.silu(gate) * up).contiguous()
    down = torch.empty(num_pairs, w2.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    weights = topk_weights.float().contiguous().flatten()
    _grouped_gemm(down, activated, w2, sorted_ids, expert_ids, weights, num_pairs, 1, block_m)
    torch.sum(down.view(num_tokens, top_k, -1), dim=1, out=out)


def register(dispatch_key: str) -> dict[str, str]:
    """Register the fused MoE kernel on `dispatch_key`."""
    return register_impls({"fused_moe": fused_moe}, dispatch_key)

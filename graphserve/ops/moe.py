"""Mixture-of-experts ops: `graphserve::fused_moe` (the routed experts of a SwiGLU MoE block) and the routing helpers.

Layout (stacked at load from the per-expert checkpoint tensors, graphserve/layers/fused_moe.py):
- `w13` [E, 2 * I, H]: each expert's gate projection (Mixtral w1, Qwen gate_proj) over its up projection (w3, up_proj);
- `w2` [E, H, I]: each expert's down projection;
- `topk_ids` [T, k] int64 and `topk_weights` [T, k] fp32: the experts each token is routed to and their weights.

out[t] = sum over j of topk_weights[t, j] * w2[e] @ (silu(gate) * up)(w13[e] @ hidden[t]), e = topk_ids[t, j].

The torch reference runs each expert once over the tokens routed to it, adding into the output in expert order like
transformers' MoE blocks (exact against them in fp32); it syncs with the host (which experts are used) and serves the
CPU. The Triton kernels (ops/triton/moe.py) group tokens by expert into blocks without a sync (graph-safe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphserve.ops._register import register_op

SCORING_FUNCS = ("softmax", "sigmoid")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   scoring_func: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] fp32, topk_ids [T, k] int64) from router logits [T, E]: scores in fp32 (softmax over the
    experts, or an independent sigmoid per expert), the k best, renormalised to sum to one when asked."""
    if scoring_func == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(router_logits.float())
    else:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def _fused_moe_ref(
    out: torch.Tensor,  # [T, H]
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k] int64
) -> None:
    """out <- the weighted sum of each token's experts, expert by expert in increasing order."""
    acc = torch.zeros_like(hidden_states)
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(hidden_states[token_idx], w13[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[token_idx, slot, None]
        acc.index_add_(0, token_idx, expert_out.to(acc.dtype))
    out.copy_(acc)


register_op("fused_moe", _fused_moe_ref, mutates_args=("out",), reference_graph_safe=False)


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
    """The routed experts' contribution for every token."""
    out = torch.empty_like(hidden_states)
    torch.ops.graphserve.fused_moe(out, hidden_states, w13, w2, topk_weights, topk_ids)
    return out

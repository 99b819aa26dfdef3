"""Mixture-of-experts layers: `FusedMoE` (the routed experts, stacked, through `graphserve::fused_moe`) and
`SparseMoeBlock` (router, experts and the optional gated shared expert of Mixtral / Qwen2-MoE / Qwen3-MoE).

Checkpoints store one tensor per expert and projection (Mixtral `experts.N.w1/w3/w2`, Qwen
`experts.N.gate_proj/up_proj/down_proj`); the model maps each to a shard id (expert, "w1" | "w3" | "w2") of the
stacked `w13_weight` [E, 2 * I, H] (gate over up) or `w2_weight` [E, H, I].
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.layers.linear import ReplicatedLinear, copy_checked, set_weight_attrs
from graphserve.ops import moe as moe_ops
from graphserve.quantization.base import QuantizationConfig

EXPERT_SHARDS = ("w1", "w3", "w2")  # gate, up, down


class FusedMoE(nn.Module):
    """The routed experts of a SwiGLU MoE block, stacked for one fused op."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 scoring_func: str = "softmax", params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError(f"{prefix}: MoE experts quantized with {quant_config.get_name()} are not supported yet; "
                             "serve an unquantized checkpoint")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{prefix}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
        if scoring_func not in moe_ops.SCORING_FUNCS:
            raise ValueError(f"{prefix}: scoring_func {scoring_func!r} is not one of {moe_ops.SCORING_FUNCS}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                                      requires_grad=False)
        experts = range(num_experts)
        set_weight_attrs(self.w13_weight, {"weight_loader": self.weight_loader,
                                           "expected_shards": {(e, s) for e in experts for s in ("w1", "w3")}})
        set_weight_attrs(self.w2_weight, {"weight_loader": self.weight_loader,
                                          "expected_shards": {(e, "w2") for e in experts}})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy one expert's gate (w1), up (w3) or down (w2) projection into its slice."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in EXPERT_SHARDS):
            raise ValueError(f"expert shard id must be (expert, one of {EXPERT_SHARDS}), got {shard_id!r}")
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range for {self.num_experts} experts")
        size = self.intermediate_size
        target = {"w1": param.data[expert, :size], "w3": param.data[expert, size:], "w2": param.data[expert]}[kind]
        copy_checked(target, loaded_weight)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # hidden_states: [num_tokens, hidden]; router_logits: [num_tokens, num_experts]
        """Route every token to its top-k experts and return their weighted sum [num_tokens, hidden]."""
        topk_weights, topk_ids = moe_ops.select_experts(router_logits, self.top_k, self.renormalize,
                                                        self.scoring_func)
        return moe_ops.fused_moe(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        """Shapes for print(model)."""
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, intermediate_size={self.intermediate_size}, "
                f"renormalize={self.renormalize}, scoring_func={self.scoring_func}")


class SparseMoeBlock(nn.Module):
    """Router (`gate`, unquantized), routed experts and an optional shared expert scaled by sigmoid(shared gate)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 shared_expert: nn.Module | None = None, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared_expert = shared_expert
        self.shared_expert_gate = (ReplicatedLinear(hidden_size, 1, bias=False, prefix=f"{prefix}.shared_expert_gate")
                                   if shared_expert is not None else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> same
        """Routed experts, plus the gated shared expert where the model has one."""
        out = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return out

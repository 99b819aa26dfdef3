"""Mixtral: the Llama decoder (with Mistral's optional sliding window) whose MLP is a sparse MoE block of
`num_local_experts` SwiGLU experts, `num_experts_per_tok` per token, weights renormalised over the chosen ones."""
from __future__ import annotations

from typing import Any

from torch import nn

from graphserve.layers.fused_moe import SparseMoeBlock
from graphserve.models.llama import DecoderOptions, LlamaForCausalLM
from graphserve.quantization.base import QuantizationConfig


def mixtral_moe(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
                quant_config: QuantizationConfig | None) -> nn.Module:
    """Every layer's MLP: router over the experts, softmax top-k renormalised."""
    if hf_config.hidden_act != "silu":
        raise ValueError(f"Unsupported activation {hf_config.hidden_act!r}: only silu is supported")
    return SparseMoeBlock(hf_config.hidden_size, hf_config.num_local_experts, hf_config.num_experts_per_tok,
                          hf_config.intermediate_size, renormalize=True, prefix=prefix, quant_config=quant_config)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral causal LM (checkpoint names `block_sparse_moe.gate` and `block_sparse_moe.experts.N.w1/w2/w3`)."""

    weight_name_rewrites = [(".block_sparse_moe.", ".mlp.")]
    expert_weight_names = {"w1": "w1", "w3": "w3", "w2": "w2"}
    mlp_factory = staticmethod(mixtral_moe)

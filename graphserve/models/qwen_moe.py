"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 decoders whose MLPs are sparse MoE blocks on the layers the config
makes sparse (every `decoder_sparse_step`-th, minus `mlp_only_layers`, which keep a dense MLP of
`intermediate_size`). Experts are `moe_intermediate_size` wide; the top-k weights are renormalised only with
`norm_topk_prob` (Qwen2-MoE checkpoints leave it off). Qwen2-MoE adds a shared expert scaled by
sigmoid(`shared_expert_gate`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from graphserve.layers.fused_moe import SparseMoeBlock
from graphserve.models.llama import DecoderOptions, LlamaMLP, dense_mlp
from graphserve.models.qwen2 import Qwen2ForCausalLM
from graphserve.models.qwen3 import Qwen3ForCausalLM
from graphserve.quantization.base import QuantizationConfig

_QWEN_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has a MoE block (transformers' rule for Qwen2-MoE / Qwen3-MoE)."""
    return (layer_idx not in (getattr(hf_config, "mlp_only_layers", None) or []) and hf_config.num_experts > 0
            and (layer_idx + 1) % hf_config.decoder_sparse_step == 0)


def qwen_moe(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
             quant_config: QuantizationConfig | None) -> nn.Module:
    """A MoE block on sparse layers (with the shared expert where the config sizes one), else the dense MLP."""
    if not is_sparse_layer(hf_config, layer_idx):
        return dense_mlp(hf_config, layer_idx, options, prefix, quant_config)
    if hf_config.hidden_act != "silu":
        raise ValueError(f"Unsupported activation {hf_config.hidden_act!r}: only silu is supported")
    shared_size = getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
    shared = (LlamaMLP(hf_config.hidden_size, shared_size, "silu", False, prefix=f"{prefix}.shared_expert",
                       quant_config=quant_config) if shared_size > 0 else None)
    return SparseMoeBlock(hf_config.hidden_size, hf_config.num_experts, hf_config.num_experts_per_tok,
                          hf_config.moe_intermediate_size, renormalize=bool(hf_config.norm_topk_prob),
                          shared_expert=shared, prefix=prefix, quant_config=quant_config)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) causal LM."""

    expert_weight_names = _QWEN_EXPERT_NAMES
    mlp_factory = staticmethod(qwen_moe)

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """q/k/v biases as the config says (`qkv_bias`, on in released checkpoints)."""
        return DecoderOptions(qkv_bias=bool(getattr(hf_config, "qkv_bias", True)))


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) causal LM."""

    expert_weight_names = _QWEN_EXPERT_NAMES
    mlp_factory = staticmethod(qwen_moe)

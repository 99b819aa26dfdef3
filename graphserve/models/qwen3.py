"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE (and head_dim from the config)."""
from __future__ import annotations

from typing import Any

from graphserve.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM."""

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """q_norm/k_norm on; attention_bias (off in released checkpoints) applies to q/k/v and o."""
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias, qk_norm=True)

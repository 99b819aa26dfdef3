"""Granite (IBM Granite 3.x dense): the Llama decoder with four multipliers from the config: token embeddings times
`embedding_multiplier`, the softmax scale `attention_multiplier` (instead of head_dim ** -0.5), every attention and
MLP output times `residual_multiplier` before its residual add, and the logits divided by `logits_scaling`."""
from __future__ import annotations

from typing import Any

from graphserve.models.llama import DecoderOptions, LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite causal LM."""

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """Llama's switches plus the three multipliers inside the decoder."""
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias,
                              mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
                              attention_scale=float(hf_config.attention_multiplier),
                              residual_multiplier=float(hf_config.residual_multiplier),
                              embedding_multiplier=float(hf_config.embedding_multiplier))

    @classmethod
    def get_logits_scale(cls, hf_config: Any) -> float:
        """1 / logits_scaling."""
        return 1.0 / float(hf_config.logits_scaling)

"""Gemma (1): the Llama decoder with GeGLU (tanh-approximated GELU gate), RMSNorms that apply (1 + w) in fp32,
embeddings scaled by sqrt(hidden_size) rounded to the model dtype, head_dim from the config and a tied head."""
from __future__ import annotations

from typing import Any

import torch

from graphserve.models.llama import DecoderOptions, LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma causal LM."""

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """Gemma norms and the embedding normalizer (computed in the dtype being built, as transformers does)."""
        normalizer = float(torch.tensor(hf_config.hidden_size**0.5, device="cpu").to(torch.get_default_dtype()))
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias, norm="gemma",
                              embedding_multiplier=normalizer)

"""Qwen2: the Llama decoder with biased q/k/v projections.

Sliding-window layers follow the config's `layer_types` (derived by transformers from
use_sliding_window / max_window_layers), so mixed full/sliding stacks are honoured per layer.
"""
from __future__ import annotations

from typing import Any

from graphserve.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM."""

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """q/k/v carry a bias; o_proj and the MLP do not."""
        return DecoderOptions(qkv_bias=True)

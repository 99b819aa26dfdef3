"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder whose checkpoints store q/k/v and gate/up already fused
(`qkv_proj`, `gate_up_proj`: loaded whole into the same fused layers), with LongRoPE scaling, an optional partial
rotary factor and the config's sliding window (all read by the shared layers)."""
from __future__ import annotations

from graphserve.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 causal LM (no per-projection shards: the checkpoint's fused tensors match our parameters)."""

    stacked_params_mapping: list = []

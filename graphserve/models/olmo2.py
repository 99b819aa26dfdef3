"""OLMo 2: a decoder that normalizes block outputs instead of inputs (post-attention and post-feedforward RMSNorms,
no input norm), with RMSNorm over the whole q and k projections (not per head) before RoPE."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.layers.layernorm import RMSNorm
from graphserve.models.llama import DecoderOptions, LlamaAttention, LlamaForCausalLM, MlpFactory, dense_mlp
from graphserve.quantization.base import QuantizationConfig


class Olmo2Attention(LlamaAttention):
    """LlamaAttention with q_norm / k_norm over all heads at once."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__(hf_config, layer_idx, options, prefix=prefix, quant_config=quant_config)
        self.q_norm = RMSNorm(self.q_size, hf_config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, hf_config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Self-attention with whole-projection q/k norms -> [num_tokens, hidden_size]."""
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, self.q_norm(q.contiguous()), self.k_norm(k.contiguous()))
        return self.o_proj(self.attn(q, k, v))


class Olmo2DecoderLayer(nn.Module):
    """x + post_ff_norm(mlp(x + post_attn_norm(attn(x)))); the stream travels as (block output, residual) so the next
    layer (or the final norm) adds them, as in the Llama layer."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = dense_mlp):
        super().__init__()
        self.self_attn = Olmo2Attention(hf_config, layer_idx, options, prefix=f"{prefix}.self_attn",
                                        quant_config=quant_config)
        self.mlp = mlp_factory(hf_config, layer_idx, options, f"{prefix}.mlp", quant_config)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normalized mlp output, the stream before it)."""
        stream = hidden_states if residual is None else residual + hidden_states
        stream = stream + self.post_attention_layernorm(self.self_attn(positions, stream))
        return self.post_feedforward_layernorm(self.mlp(stream)), stream


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2 causal LM."""

    decoder_layer_cls = Olmo2DecoderLayer

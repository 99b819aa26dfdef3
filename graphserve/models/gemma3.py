"""Gemma 3 (text): Gemma's GeGLU, (1 + w) norms and embedding scale, plus per-head q/k norms, four norms per layer
(pre and post attention, pre and post feed-forward), the softmax scale `query_pre_attn_scalar ** -0.5`, local
(sliding-window) and global layers by `layer_types` with their own RoPE parameters, and an optional final logit
soft-cap (and the attention-logit soft-cap where the config sets one, PAGED_ATTN only)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.layers.layernorm import GemmaRMSNorm
from graphserve.layers.logits_processor import LogitsProcessor
from graphserve.models.llama import DecoderOptions, LlamaAttention, LlamaForCausalLM, LlamaMLP, MlpFactory
from graphserve.quantization.base import QuantizationConfig


def gemma3_mlp(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
               quant_config: QuantizationConfig | None) -> nn.Module:
    """GeGLU of `intermediate_size` (`hidden_activation`)."""
    return LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_activation, False,
                    prefix=prefix, quant_config=quant_config)


class Gemma3DecoderLayer(nn.Module):
    """x + post_ff(mlp(pre_ff(x + post_attn(attn(in(x)))))); the stream travels as (block output, residual)."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = gemma3_mlp):
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, layer_idx, options, prefix=f"{prefix}.self_attn",
                                        quant_config=quant_config)
        self.mlp = mlp_factory(hf_config, layer_idx, options, f"{prefix}.mlp", quant_config)
        eps = hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the normalized mlp output, the stream before it)."""
        stream = hidden_states if residual is None else residual + hidden_states
        attn = self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(stream)))
        stream = stream + attn
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(stream))), stream


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text causal LM (tied head)."""

    mlp_factory = staticmethod(gemma3_mlp)
    decoder_layer_cls = Gemma3DecoderLayer
    qk_norm = True

    def __init__(self, model_config: Any):
        super().__init__(model_config)
        cap = getattr(model_config.hf_config, "final_logit_softcapping", None)
        self.logits_processor = LogitsProcessor(model_config.hf_config.vocab_size, logits_soft_cap=cap)

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """Gemma norms (also on q and k per head), the embedding normalizer, the query_pre_attn_scalar scale and
        the attention soft-cap where the config sets one."""
        normalizer = float(torch.tensor(hf_config.hidden_size**0.5, device="cpu").to(torch.get_default_dtype()))
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, qk_norm=cls.qk_norm, norm="gemma",
                              embedding_multiplier=normalizer,
                              attention_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
                              attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None))

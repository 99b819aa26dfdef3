"""GPT-NeoX (Pythia, GPT-NeoX-20B, ...): LayerNorms, a fused `query_key_value` stored head by head (q, k, v of
head 0, then of head 1, ...; reordered at load into our [q | k | v] layout), partial rotary (`rotary_pct`), a GELU
MLP with biases, and the parallel residual x + attn(ln1(x)) + mlp(ln2(x)) (or the sequential one when
`use_parallel_residual` is off). Checkpoint names are mapped onto the shared decoder's."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graphserve.models.llama import DecoderOptions, LlamaAttention, LlamaForCausalLM, MlpFactory, make_norm
from graphserve.models.starcoder2 import Starcoder2MLP
from graphserve.quantization.base import QuantizationConfig


def neox_mlp(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
             quant_config: QuantizationConfig | None) -> nn.Module:
    """dense_4h_to_h(gelu(dense_h_to_4h(x))), biased (stored as c_fc / c_proj)."""
    return Starcoder2MLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, True,
                         prefix=prefix, quant_config=quant_config)


class GPTNeoXLayer(nn.Module):
    """One block; the stream travels as (block output, residual) like the Llama layer."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = neox_mlp):
        super().__init__()
        self.use_parallel_residual = bool(hf_config.use_parallel_residual)
        self.input_layernorm = make_norm(hf_config, options)
        self.post_attention_layernorm = make_norm(hf_config, options)
        self.attention = LlamaAttention(hf_config, layer_idx, options, prefix=f"{prefix}.attention",
                                        quant_config=quant_config)
        self.mlp = mlp_factory(hf_config, layer_idx, options, f"{prefix}.mlp", quant_config)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the block's addition to the stream, the stream before it)."""
        stream = hidden_states if residual is None else residual + hidden_states
        attn = self.attention(positions, self.input_layernorm(stream))
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(stream)) + attn, stream
        stream = attn + stream
        return self.mlp(self.post_attention_layernorm(stream)), stream


def interleaved_qkv_to_stacked(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[heads * 3 * head_dim, ...] (per head: q, k, v) -> [3 * heads * head_dim, ...] (all q, all k, all v)."""
    rest = tensor.shape[1:]
    per_head = tensor.reshape(num_heads, 3, tensor.shape[0] // (3 * num_heads), *rest)
    return per_head.transpose(0, 1).reshape(tensor.shape)


class GPTNeoXForCausalLM(LlamaForCausalLM):
    """GPT-NeoX causal LM."""

    stacked_params_mapping: list = []
    skipped_weight_suffixes = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
    weight_name_rewrites = [
        ("gpt_neox.embed_in.", "model.embed_tokens."), ("gpt_neox.final_layer_norm.", "model.norm."),
        ("gpt_neox.layers.", "model.layers."), ("embed_out.", "lm_head."),
        (".attention.query_key_value.", ".attention.qkv_proj."), (".attention.dense.", ".attention.o_proj."),
        (".mlp.dense_h_to_4h.", ".mlp.c_fc."), (".mlp.dense_4h_to_h.", ".mlp.c_proj."),
    ]
    mlp_factory = staticmethod(neox_mlp)
    decoder_layer_cls = GPTNeoXLayer

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """LayerNorms; attention projections biased with `attention_bias` (on in released checkpoints)."""
        bias = bool(getattr(hf_config, "attention_bias", True))
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, norm="layer")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The shared loader, after putting each fused query_key_value back in [q | k | v] order."""
        heads = self.model_config.hf_config.num_attention_heads

        def reordered():
            for name, tensor in weights:
                if ".attention.query_key_value." in name:
                    tensor = interleaved_qkv_to_stacked(tensor, heads)
                yield name, tensor

        return super().load_weights(reordered())

"""Falcon (7B / 40B / 180B and Falcon-2 layouts): LayerNorms, rotary attention with multi-query (`multi_query`) or
grouped KV heads (`new_decoder_architecture`), a GELU MLP, and the parallel block x + attn(ln(x)) + mlp(ln'(x))
(one shared norm, or `ln_attn` / `ln_mlp`), or the sequential one without `parallel_attn`. The fused
`query_key_value` is reordered at load from Falcon's layouts into [q | k | v]. ALiBi checkpoints (Falcon-RW) are
refused until the attention ops take ALiBi slopes."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graphserve.models.gpt_neox import interleaved_qkv_to_stacked
from graphserve.models.llama import DecoderOptions, LlamaAttention, LlamaForCausalLM, MlpFactory, make_norm
from graphserve.models.starcoder2 import Starcoder2MLP
from graphserve.quantization.base import QuantizationConfig


def falcon_mlp(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
               quant_config: QuantizationConfig | None) -> nn.Module:
    """dense_4h_to_h(gelu(dense_h_to_4h(x))) (stored as c_fc / c_proj), biased with `bias`."""
    return Starcoder2MLP(hf_config.hidden_size, hf_config.ffn_hidden_size, hf_config.activation,
                         bool(hf_config.bias), prefix=prefix, quant_config=quant_config)


def _num_block_norms(hf_config: Any) -> int:
    """Norms inside a parallel block: two (ln_attn, ln_mlp) for the new architecture unless the config says one."""
    count = getattr(hf_config, "num_ln_in_parallel_attn", None)
    return count if count is not None else (2 if hf_config.new_decoder_architecture else 1)


class FalconDecoderLayer(nn.Module):
    """One block; the stream travels as (block output, residual) like the Llama layer."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = falcon_mlp):
        super().__init__()
        self.parallel = bool(hf_config.parallel_attn)
        self.two_norms = self.parallel and _num_block_norms(hf_config) == 2
        self.self_attn = LlamaAttention(hf_config, layer_idx, options, prefix=f"{prefix}.self_attn",
                                        quant_config=quant_config)
        self.mlp = mlp_factory(hf_config, layer_idx, options, f"{prefix}.mlp", quant_config)
        if self.two_norms:
            self.ln_attn = make_norm(hf_config, options)
            self.ln_mlp = make_norm(hf_config, options)
        else:
            self.input_layernorm = make_norm(hf_config, options)
            if not self.parallel:
                self.post_attention_layernorm = make_norm(hf_config, options)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the block's addition to the stream, the stream before it)."""
        stream = hidden_states if residual is None else residual + hidden_states
        if self.two_norms:
            attn = self.self_attn(positions, self.ln_attn(stream))
            return self.mlp(self.ln_mlp(stream)) + attn, stream
        normed = self.input_layernorm(stream)
        attn = self.self_attn(positions, normed)
        if self.parallel:
            return self.mlp(normed) + attn, stream
        stream = attn + stream
        return self.mlp(self.post_attention_layernorm(stream)), stream


def grouped_qkv_to_stacked(tensor: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """New-architecture layout [kv_heads, (heads / kv_heads) queries + key + value, head_dim, ...] -> [q | k | v]."""
    group = num_heads // num_kv_heads
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_kv_heads, group + 2, tensor.shape[0] // (num_kv_heads * (group + 2)), *rest)
    return torch.cat([grouped[:, :group].reshape(-1, *rest), grouped[:, group].reshape(-1, *rest),
                      grouped[:, group + 1].reshape(-1, *rest)])


class FalconForCausalLM(LlamaForCausalLM):
    """Falcon causal LM."""

    stacked_params_mapping: list = []
    weight_name_rewrites = [
        ("transformer.word_embeddings.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
        ("transformer.h.", "model.layers."), (".self_attention.query_key_value.", ".self_attn.qkv_proj."),
        (".self_attention.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.c_fc."),
        (".mlp.dense_4h_to_h.", ".mlp.c_proj."),
    ]
    mlp_factory = staticmethod(falcon_mlp)
    decoder_layer_cls = FalconDecoderLayer

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """LayerNorms; q/k/v and the output projection biased with `bias`. ALiBi is refused."""
        if getattr(hf_config, "alibi", False):
            raise ValueError("Falcon with alibi=True (Falcon-RW) is not supported yet: the attention ops have no "
                             "ALiBi slopes; rotary Falcon checkpoints are")
        bias = bool(hf_config.bias)
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, norm="layer")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The shared loader, after putting each fused query_key_value in [q | k | v] order."""
        config = self.model_config.hf_config
        heads = config.num_attention_heads

        def reordered():
            for name, tensor in weights:
                if ".self_attention.query_key_value." in name:
                    if config.new_decoder_architecture:
                        tensor = grouped_qkv_to_stacked(tensor, heads, config.num_kv_heads)
                    elif not config.multi_query:
                        tensor = interleaved_qkv_to_stacked(tensor, heads)
                yield name, tensor

        return super().load_weights(reordered())

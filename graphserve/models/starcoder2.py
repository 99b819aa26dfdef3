"""StarCoder2: the pre-norm decoder with LayerNorms (weight and bias), biased q/k/v/o projections (`use_bias`), a
plain two-layer MLP `c_proj(gelu_tanh(c_fc(x)))` and the config's sliding window."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from graphserve.models.llama import DecoderOptions, LlamaForCausalLM
from graphserve.quantization.base import QuantizationConfig

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


class Starcoder2MLP(nn.Module):
    """c_fc -> GELU -> c_proj, with biases when the config has them."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported activation {hidden_act!r}: StarCoder2 supports {sorted(_ACTIVATIONS)}")
        self.approximate = _ACTIVATIONS[hidden_act]
        self.c_fc = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias, quant_config=quant_config,
                                         prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> same
        """c_proj(gelu(c_fc(x)))."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


def starcoder2_mlp(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
                   quant_config: QuantizationConfig | None) -> nn.Module:
    return Starcoder2MLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act,
                         bool(hf_config.use_bias), prefix=prefix, quant_config=quant_config)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """StarCoder2 causal LM (tied embeddings as the config says)."""

    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
    ]
    mlp_factory = staticmethod(starcoder2_mlp)

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """LayerNorms; every attention projection biased with `use_bias`."""
        bias = bool(hf_config.use_bias)
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, norm="layer")

"""SqueezeLLM (dense `-s0` checkpoints, formats.md §3): 4-bit indices into a per-output-channel table of 16
non-uniform values.

Checkpoint tensors per projection: `qweight` [K/8, N] int32 (indices packed sequentially along K) and
`lookup_table` [N, 16] (fp32 as SqueezeLLM writes it; kept in fp32). Served by `squeezellm_gemm`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.ops import quant as quant_ops
from graphserve.quantization.base import LinearMethodBase, QuantizationConfig
from graphserve.quantization.grouped import add_param


class SqueezeLLMConfig(QuantizationConfig):
    """SqueezeLLM settings: only 4-bit tables exist."""

    @classmethod
    def get_name(cls) -> str:
        return "squeezellm"

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        """SqueezeLLM's quant_config.json ({"wbits": 4})."""
        return ["quant_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SqueezeLLMConfig:
        """Check `wbits`."""
        if config.get("wbits") != 4:
            raise ValueError(f"quantization config: SqueezeLLM wbits={config.get('wbits')} is not supported (only 4)")
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """Every linear layer of the decoder is quantized."""
        return SqueezeLLMLinearMethod(prefix)


class SqueezeLLMLinearMethod(LinearMethodBase):
    """qweight and lookup_table as the checkpoint stores them; nothing to repack."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def checkpoint_tensor_shapes(self, input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
        """qweight [K/8, N], lookup_table [N, 16]."""
        if input_size % 8:
            raise ValueError(f"{self.prefix}: SqueezeLLM packs 8 inputs per word; {input_size} do not fill them")
        return {"qweight": (input_size // 8, output_size), "lookup_table": (output_size, 16)}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader) -> None:
        """The checkpoint's two tensors, stacked along the output for q/k/v and gate/up."""
        for size in output_sizes:
            self.checkpoint_tensor_shapes(input_size, size)
        n = sum(output_sizes)
        add_param(layer, "qweight", (input_size // 8, n), torch.int32,
                  {"output_dim": 1, "weight_loader": weight_loader})
        add_param(layer, "lookup_table", (n, 16), torch.float32, {"output_dim": 0, "weight_loader": weight_loader})

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N] through the LUT GEMM."""
        x2d = x.reshape(-1, x.shape[-1])
        out = quant_ops.squeezellm_gemm(x2d, layer.qweight, layer.lookup_table)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])

"""AWQ (AutoAWQ "GEMM" checkpoints, formats.md §1): 4-bit, asymmetric zero points, groups along the input.

Checkpoint tensors per projection: `qweight` [K, N/8] and `qzeros` [K/G, N/8] int32 (nibbles interleaved in
AWQ_ORDER along the output), `scales` [K/G, N] fp16. At load they are unpacked and repacked along K, the
engine's layout, and served by `quant_gemm` (any activation dtype: no fp16 cast, so bf16 models cannot overflow).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.quantization.base import LinearMethodBase, QuantizationConfig
from graphserve.quantization.grouped import GroupedLinearMethod, add_param, group_rows, validate_group_size
from graphserve.quantization.packing import unpack_awq


def _first(config: dict[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    return next((config[k] for k in keys if k in config), default)


class AWQConfig(QuantizationConfig):
    """AWQ settings: 4 bits, a group size, and the modules left in full precision."""

    def __init__(self, group_size: int, zero_point: bool = True, modules_to_not_convert: list[str] | None = None):
        validate_group_size(group_size)
        if not zero_point:
            raise ValueError("quantization config: AWQ with zero_point=false is not supported (GEMM checkpoints "
                             "are asymmetric)")
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def get_name(cls) -> str:
        return "awq"

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        """llm-awq's quant_config.json, or AutoAWQ's quantize_config.json (older checkpoints)."""
        return ["quant_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        """Read `bits`/`w_bit`, `group_size`/`q_group_size`, `zero_point`, `version`, `modules_to_not_convert`."""
        bits = _first(config, ("bits", "w_bit"))
        if bits != 4:
            raise ValueError(f"quantization config: AWQ bits={bits} is not supported (only 4)")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization config: AWQ version={config.get('version')!r} is not supported (only "
                             "GEMM checkpoints; GEMV ones store another layout)")
        group_size = _first(config, ("group_size", "q_group_size"))
        if group_size is None:
            raise ValueError("quantization config: AWQ needs group_size (or q_group_size)")
        return cls(int(group_size), bool(config.get("zero_point", True)), config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """AWQLinearMethod, except for the modules the checkpoint keeps unquantized."""
        if any(name in prefix for name in self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self, prefix)


class AWQLinearMethod(GroupedLinearMethod):
    """Creates AWQ's three tensors, then repacks them into the engine's layout."""

    def __init__(self, config: AWQConfig, prefix: str) -> None:
        super().__init__(config.group_size, prefix)

    def checkpoint_tensor_shapes(self, input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
        """qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]."""
        if output_size % 8:
            raise ValueError(f"{self.prefix}: AWQ packs 8 outputs per word; {output_size} outputs do not fill them")
        groups = group_rows(input_size, self.group_size, self.prefix)
        return {"qweight": (input_size, output_size // 8), "qzeros": (groups, output_size // 8),
                "scales": (groups, output_size)}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader) -> None:
        """The checkpoint's tensors, stacked along the output for q/k/v and gate/up (8 outputs a word)."""
        n = sum(output_sizes)
        for size in output_sizes:
            self.checkpoint_tensor_shapes(input_size, size)
        groups = group_rows(input_size, self.group_size, self.prefix)
        packed = {"output_dim": 1, "packed_dim": 1, "pack_factor": 8, "weight_loader": weight_loader}
        add_param(layer, "qweight", (input_size, n // 8), torch.int32, packed)
        add_param(layer, "qzeros", (groups, n // 8), torch.int32, dict(packed))
        add_param(layer, "scales", (groups, n), torch.float16, {"output_dim": 1, "weight_loader": weight_loader})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Undo the nibble interleave; codes go along K, zeros become numbers."""
        codes = unpack_awq(layer.qweight.data)
        zeros = unpack_awq(layer.qzeros.data)
        self.finish_loading(layer, codes, zeros, layer.scales.data, 4, None)

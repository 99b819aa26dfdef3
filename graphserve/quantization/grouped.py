"""What AWQ and GPTQ share once loaded: grouped integer codes with a scale and a zero point per (group, column),
repacked into the engine's layout (ops/quant.py) and multiplied by `torch.ops.graphserve.quant_gemm`."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.ops import quant as quant_ops
from graphserve.quantization.base import LinearMethodBase, set_weight_attrs
from graphserve.quantization.packing import pack_sequential

# Group sizes the kernels tile: -1 (one group per column) or a multiple of 32 input rows.
GROUP_SIZE_STEP = 32


def validate_group_size(group_size: int, field: str = "group_size") -> None:
    """ValueError naming the field unless it is -1 or a positive multiple of 32."""
    if group_size != -1 and (group_size <= 0 or group_size % GROUP_SIZE_STEP):
        raise ValueError(f"quantization config: {field}={group_size} is not supported; use -1 (per channel) or a "
                         f"positive multiple of {GROUP_SIZE_STEP}")


def group_rows(input_size: int, group_size: int, prefix: str) -> int:
    """How many groups an input of `input_size` has; ValueError if the groups do not divide it."""
    size = input_size if group_size == -1 else group_size
    if input_size % size:
        raise ValueError(f"{prefix}: group_size {group_size} does not divide the input size {input_size}")
    return input_size // size


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, attrs: dict[str, Any]) -> None:
    """Register an empty checkpoint parameter with its loader attributes."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    layer.register_parameter(name, param)


class GroupedLinearMethod(LinearMethodBase):
    """Applies the engine's layout: `qweight` [K * bits / 32, N], `scales` / `zeros` [K / G, N], optional `perm`."""

    def __init__(self, group_size: int, prefix: str) -> None:
        self.group_size = group_size
        self.prefix = prefix

    def finish_loading(
        self,
        layer: nn.Module,
        codes: torch.Tensor,  # [K, N] int32 codes, rows in the order the kernel reads x's columns
        zeros: torch.Tensor,  # [num_groups, N] zero points (exact integers)
        scales: torch.Tensor,  # [num_groups, N]
        bits: int,
        perm: torch.Tensor | None,  # [K] int64: x's columns in that order (GPTQ act-order), None = as they are
    ) -> None:
        """Replace the checkpoint parameters with the engine's layout (codes wider than 3 bits stay as they are,
        3-bit codes go into 4-bit fields: the kernels read 2, 4 or 8)."""
        for name in list(layer._parameters):
            if name != "bias":
                delattr(layer, name)
        stored_bits = 4 if bits == 3 else bits
        layer.quant_bits = stored_bits
        layer.quant_group_size = codes.shape[0] // scales.shape[0]
        frozen = {"requires_grad": False}
        layer.qweight = nn.Parameter(pack_sequential(codes, stored_bits, 0), **frozen)
        layer.scales = nn.Parameter(scales.to(torch.float16).contiguous(), **frozen)
        layer.zeros = nn.Parameter(zeros.to(torch.float16).contiguous(), **frozen)
        layer.perm = None if perm is None else nn.Parameter(perm.to(torch.int64), **frozen)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N] through the quantized GEMM (x's columns permuted first for act-order)."""
        x2d = x.reshape(-1, x.shape[-1])
        if layer.perm is not None:
            x2d = x2d.index_select(1, layer.perm)
        out = quant_ops.quant_gemm(x2d, layer.qweight, layer.scales, layer.zeros, layer.quant_bits,
                                   layer.quant_group_size)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])

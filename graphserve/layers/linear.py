"""Linear layers with per-parameter weight loaders (vLLM vocabulary: the column / row split names are where
tensor parallelism will shard them).

Every layer owns a `quant_method` (a `LinearMethodBase`, graphserve/quantization/) that creates its parameters
and applies the matmul, so a quantization scheme replaces both without touching model code. Each parameter
carries a `weight_loader(param, loaded_weight, shard_id=None)` that knows which slice of the parameter a
checkpoint tensor (or one shard of a packed projection: q/k/v, gate/up) belongs to: shards stack along the
parameter's `output_dim`, divided by its `pack_factor` where that dim is packed (AWQ's qweight).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphserve.quantization.base import LinearMethodBase, QuantizationConfig, set_weight_attrs

__all__ = ["LinearMethodBase", "set_weight_attrs"]  # re-exported: the layers' side of the seam


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint tensor into a parameter slice, failing loudly on a shape mismatch."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter slice "
                         f"of shape {tuple(dst.shape)}")
    dst.copy_(src)


class UnquantizedLinearMethod(LinearMethodBase):
    """Plain dense weight [output, input] in the model dtype."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        """Register `weight` [sum(output_sizes), input_size]."""
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Dense matmul."""
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Common constructor: resolves the quant method, which creates the parameters of `output_sizes` stacked."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.params_dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.prefix = prefix
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method if method is not None else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, self.output_sizes, self.params_dtype, self.weight_loader)
        if bias:
            bias_param = nn.Parameter(torch.empty(self.output_size, dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(bias_param, {"output_dim": 0, "weight_loader": self.weight_loader})
            self.register_parameter("bias", bias_param)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy a whole checkpoint tensor, or one shard of a stacked projection (`shard_index` names its slot)."""
        if shard_id is None:
            copy_checked(param.data, loaded_weight)
            return
        index = self.shard_index(shard_id)
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            # The same tensor for every shard (g_idx: q, k and v read one input): the shards must agree.
            loaded = getattr(param, "loaded_shards", None)
            if loaded and not torch.equal(param.data, loaded_weight.to(param.device, param.dtype)):
                raise ValueError(f"shard {shard_id!r} differs from shard(s) {sorted(map(str, loaded))} already "
                                 "loaded into this parameter, which all shards share")
            copy_checked(param.data, loaded_weight)
            param.loaded_shards = (loaded or set()) | {shard_id}
            return
        pack = getattr(param, "pack_factor", 1) if getattr(param, "packed_dim", None) == output_dim else 1
        offset = sum(self.output_sizes[:index])
        if offset % pack or self.output_sizes[index] % pack:
            raise ValueError(f"shard {shard_id!r} of {self.output_sizes[index]} outputs is not a whole number of "
                             f"packed words of {pack}")
        copy_checked(param.data.narrow(output_dim, offset // pack, self.output_sizes[index] // pack), loaded_weight)

    def shard_index(self, shard_id: Any) -> int:
        """Position of a checkpoint shard in `output_sizes`."""
        raise ValueError(f"{type(self).__name__} has no shards; got shard_id {shard_id!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size]."""
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        """Shapes for print(model)."""
        return (f"in_features={self.input_size}, out_features={self.output_size}, bias={self.bias is not None}, "
                f"quant_method={type(self.quant_method).__name__}")


class ReplicatedLinear(LinearBase):
    """A plain linear layer (one that tensor parallelism would replicate on every rank)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kwargs: Any):
        super().__init__(input_size, [output_size], bias, **kwargs)


class ColumnParallelLinear(LinearBase):
    """Y = X A^T over several output blocks (`output_sizes`), each a shard a checkpoint may store separately."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 output_sizes: list[int] | None = None, **kwargs: Any):
        output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        if sum(output_sizes) != output_size:
            raise ValueError(f"output_sizes {output_sizes} do not add up to {output_size}")
        super().__init__(input_size, output_sizes, bias, **kwargs)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of one input stacked in one matmul (gate_up_proj).

    Shard ids are the integer positions in `output_sizes` (0 = gate_proj, 1 = up_proj).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, **kwargs: Any):
        super().__init__(input_size, sum(output_sizes), bias=bias, output_sizes=list(output_sizes), **kwargs)

    def shard_index(self, shard_id: Any) -> int:
        """The shard id is the position."""
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id {shard_id!r} out of range for {len(self.output_sizes)} merged outputs")
        return shard_id


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection (shard ids "q", "k", "v")."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True, **kwargs: Any):
        self.head_size = head_size
        self.num_heads = total_num_heads
        self.num_kv_heads = total_num_kv_heads if total_num_kv_heads is not None else total_num_heads
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        super().__init__(hidden_size, q_size + 2 * kv_size, bias=bias, output_sizes=[q_size, kv_size, kv_size],
                         **kwargs)

    def shard_index(self, shard_id: Any) -> int:
        """q, k, v in that order."""
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id)
        if index is None:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return index


class RowParallelLinear(LinearBase):
    """Y = X A^T, the projection back to the hidden size (o_proj, down_proj)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kwargs: Any):
        super().__init__(input_size, [output_size], bias, **kwargs)

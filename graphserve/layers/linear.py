"""Linear layers with per-parameter weight loaders (vLLM vocabulary: the column / row split names are where
tensor parallelism will shard them).

Every layer owns a `quant_method` (a `LinearMethodBase`) that creates its weights and applies the
matmul, so a quantization scheme can replace both without touching model code. Each parameter
carries a `weight_loader(param, loaded_weight, shard_id=None)` that knows which slice of the
parameter a checkpoint tensor (or one shard of a packed projection: q/k/v, gate/up) belongs to.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Attach loader metadata (`weight_loader`, `input_dim`, `output_dim`, ...) to a parameter."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise AttributeError(f"overwriting existing tensor attribute {key!r}")
        setattr(param, key, value)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint tensor into a parameter slice, failing loudly on a shape mismatch."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter slice "
                         f"of shape {tuple(dst.shape)}")
    dst.copy_(src)


class LinearMethodBase(ABC):
    """How a linear layer stores and applies its weights (unquantized, or a quantization scheme)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        """Register the layer's weight parameters (per TP partition) on `layer`."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Compute `x @ W.T (+ bias)` for input x [num_tokens, input_size_per_partition]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack weights once the checkpoint is loaded (no-op unless the scheme needs it)."""


class UnquantizedLinearMethod(LinearMethodBase):
    """Plain dense weight [output, input] in the model dtype."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        """Register `weight` [sum(output_partition_sizes), input_size_per_partition]."""
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Dense matmul."""
        return F.linear(x, layer.weight, bias)


class QuantizationConfig(Protocol):
    """What a quantization config must offer to the linear layers."""

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """Return the method for this layer, or None to keep it unquantized."""


class LinearBase(nn.Module):
    """Common constructor: resolves the quant method."""

    def __init__(self, input_size: int, output_size: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.prefix = prefix
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method if method is not None else UnquantizedLinearMethod()

    def _create_bias(self, size: int, attrs: dict[str, Any]) -> None:
        bias = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
        set_weight_attrs(bias, attrs)
        self.register_parameter("bias", bias)

    def extra_repr(self) -> str:
        """Shapes for print(model)."""
        return f"in_features={self.input_size}, out_features={self.output_size}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    """A plain linear layer (one that tensor parallelism would replicate on every rank)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kwargs: Any):
        super().__init__(input_size, output_size, **kwargs)
        self.quant_method.create_weights(self, input_size, [output_size], self.params_dtype, self.weight_loader)
        if bias:
            self._create_bias(output_size, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy the whole tensor."""
        copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size]."""
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A^T over several output blocks (`output_sizes`), each a shard a checkpoint may store separately."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 output_sizes: list[int] | None = None, **kwargs: Any):
        super().__init__(input_size, output_size, **kwargs)
        self.output_sizes = output_sizes if output_sizes is not None else [output_size]
        if sum(self.output_sizes) != output_size:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to {output_size}")
        self.quant_method.create_weights(self, input_size, self.output_sizes, self.params_dtype, self.weight_loader)
        if bias:
            self._create_bias(output_size, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy the whole checkpoint tensor."""
        copy_checked(param.data, loaded_weight)

    def _load_shard(self, param: nn.Parameter, loaded_weight: torch.Tensor, offset: int, size: int) -> None:
        """Copy one projection's checkpoint tensor into rows [offset, offset + size) of the fused parameter."""
        output_dim = param.output_dim
        copy_checked(param.data.narrow(output_dim, offset, size), loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size]."""
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of one input stacked in one matmul (gate_up_proj).

    Shard ids are the integer positions in `output_sizes` (0 = gate_proj, 1 = up_proj).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, **kwargs: Any):
        super().__init__(input_size, sum(output_sizes), bias=bias, output_sizes=list(output_sizes), **kwargs)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None) -> None:
        """Place one logical projection (shard_id) into its rows; None means an already-fused tensor."""
        if shard_id is None or getattr(param, "output_dim", None) is None:
            copy_checked(param.data, loaded_weight)
            return
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id {shard_id} out of range for {len(self.output_sizes)} merged outputs")
        self._load_shard(param, loaded_weight, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id])


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

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        """Place the q, k or v projection; None means an already-fused [q; k; v] tensor."""
        if shard_id is None or getattr(param, "output_dim", None) is None:
            copy_checked(param.data, loaded_weight)
            return
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id)
        if index is None:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        self._load_shard(param, loaded_weight, sum(self.output_sizes[:index]), self.output_sizes[index])


class RowParallelLinear(LinearBase):
    """Y = X A^T, the projection back to the hidden size (o_proj, down_proj)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kwargs: Any):
        super().__init__(input_size, output_size, **kwargs)
        self.quant_method.create_weights(self, input_size, [output_size], self.params_dtype, self.weight_loader)
        if bias:
            self._create_bias(output_size, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy the whole checkpoint tensor."""
        copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size]."""
        return self.quant_method.apply(self, x, self.bias)

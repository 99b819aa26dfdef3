"""Linear layers with tensor-parallel shapes and per-parameter weight loaders (vLLM vocabulary).

Every layer owns a `quant_method` (a `LinearMethodBase`) that creates its weights and applies the
matmul, so a quantization scheme can replace both without touching model code. Each parameter
carries a `weight_loader(param, loaded_weight, shard_id=None)` that knows which slice of the
parameter a checkpoint tensor (or one shard of a packed projection) belongs to on this TP rank.

Tensor parallelism: layers take `tp_rank`/`tp_size` (default 0/1). Shapes and loaders are exact for
any size; communication (all-reduce after `RowParallelLinear`) uses torch.distributed when
tp_size > 1 and `reduce_results` is set.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Attach loader metadata (`weight_loader`, `input_dim`, `output_dim`, ...) to a parameter."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise AttributeError(f"overwriting existing tensor attribute {key!r}")
        setattr(param, key, value)


def divide(numerator: int, denominator: int) -> int:
    """Exact integer division; raise if the TP size does not divide the dimension."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


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
    """Common constructor: resolves the quant method and records TP geometry."""

    def __init__(self, input_size: int, output_size: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.prefix = prefix
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method if method is not None else UnquantizedLinearMethod()

    def _create_bias(self, size: int, attrs: dict[str, Any]) -> None:
        bias = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
        set_weight_attrs(bias, attrs)
        self.register_parameter("bias", bias)

    def extra_repr(self) -> str:
        """Shapes and TP geometry for print(model)."""
        return (f"in_features={self.input_size}, out_features={self.output_size}, "
                f"bias={self.bias is not None}, tp_size={self.tp_size}")


class ReplicatedLinear(LinearBase):
    """A linear layer whose full weight lives on every rank."""

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
    """Y = X A with A split by output columns: each rank holds output_size / tp_size rows of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 output_sizes: list[int] | None = None, **kwargs: Any):
        super().__init__(input_size, output_size, **kwargs)
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self.output_sizes = output_sizes if output_sizes is not None else [output_size]
        partition_sizes = [divide(size, self.tp_size) for size in self.output_sizes]
        self.quant_method.create_weights(self, input_size, partition_sizes, self.params_dtype, self.weight_loader)
        if bias:
            self._create_bias(self.output_size_per_partition, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's slice along the output dimension of the full checkpoint tensor."""
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None:
            size = param.shape[output_dim]
            loaded_weight = loaded_weight.narrow(output_dim, self.tp_rank * size, size)
        copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size / tp_size] (this rank's columns)."""
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked in one matmul (gate_up_proj).

    Shard ids are the integer positions in `output_sizes` (0 = gate_proj, 1 = up_proj).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, **kwargs: Any):
        super().__init__(input_size, sum(output_sizes), bias=bias, output_sizes=list(output_sizes), **kwargs)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None) -> None:
        """Place one logical projection (shard_id) into its rows; None means an already-fused tensor."""
        output_dim = getattr(param, "output_dim", None)
        if shard_id is None or output_dim is None:
            if output_dim is None:  # an unsharded per-layer parameter: identical for every shard
                copy_checked(param.data, loaded_weight)
                return
            offset = 0
            for index, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(output_dim, offset, size), index)
                offset += size
            return
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id {shard_id} out of range for {len(self.output_sizes)} merged outputs")
        shard_offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard_size = self.output_sizes[shard_id] // self.tp_size
        source = loaded_weight.narrow(output_dim, self.tp_rank * shard_size, shard_size)
        copy_checked(param.data.narrow(output_dim, shard_offset, shard_size), source)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection (shard ids "q", "k", "v"); KV heads are replicated when tp_size > num_kv_heads."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True, tp_size: int = 1, **kwargs: Any):
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads if total_num_kv_heads is not None else total_num_heads
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads)
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        # output_sizes are the per-rank sizes times tp_size, so column slicing stays uniform.
        output_sizes = [q_size * tp_size, kv_size * tp_size, kv_size * tp_size]
        super().__init__(hidden_size, sum(output_sizes), bias=bias, output_sizes=output_sizes,
                         tp_size=tp_size, **kwargs)

    def _shard_offset_size(self, shard_id: str) -> tuple[int, int]:
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        if shard_id not in offsets:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return offsets[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        """Place the q, k or v projection of this rank's heads; None means an already-fused [q; k; v] tensor."""
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            copy_checked(param.data, loaded_weight)
            return
        if shard_id is None:
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            for sid, offset, size in (("q", 0, q_total), ("k", q_total, kv_total), ("v", q_total + kv_total, kv_total)):
                self.weight_loader(param, loaded_weight.narrow(output_dim, offset, size), sid)
            return
        shard_offset, shard_size = self._shard_offset_size(shard_id)
        # Ranks that share a replicated KV head read the same slice of the checkpoint.
        source_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        source = loaded_weight.narrow(output_dim, source_rank * shard_size, shard_size)
        copy_checked(param.data.narrow(output_dim, shard_offset, shard_size), source)


class RowParallelLinear(LinearBase):
    """Y = X A with A split by input rows: each rank multiplies its input slice; results are summed."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 reduce_results: bool = True, **kwargs: Any):
        super().__init__(input_size, output_size, **kwargs)
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self.reduce_results = reduce_results
        self.quant_method.create_weights(self, self.input_size_per_partition, [output_size],
                                         self.params_dtype, self.weight_loader)
        if bias:
            self._create_bias(output_size, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's slice along the input dimension (the bias is replicated)."""
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None:
            size = param.shape[input_dim]
            loaded_weight = loaded_weight.narrow(input_dim, self.tp_rank * size, size)
        copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size / tp_size]
        """[num_tokens, input_size / tp_size] -> [num_tokens, output_size] (summed over ranks if reducing)."""
        # Only rank 0 adds the bias so that the all-reduce counts it once.
        bias = self.bias if self.tp_rank == 0 else None
        output = self.quant_method.apply(self, x, bias)
        if self.reduce_results and self.tp_size > 1:
            torch.distributed.all_reduce(output)
        return output

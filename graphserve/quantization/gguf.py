"""GGUF quant types kept as their blocks on the device (block layouts: ops/gguf.py).

The config holds the ggml type of every projection, embedding and head of the file (read from its header before
anything is built), so each layer allocates exactly the bytes its tensors take. A stacked layer (q/k/v, gate/up)
keeps its shards in one flat byte parameter, one region per shard: llama.cpp's mixed recipes (Q4_K_M stores
attn_v and some ffn_down in Q6_K) give shards of different types, multiplied one by one and concatenated; shards
of one type form a single [N, row_bytes] matrix and one GEMM.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.ops import gguf as gguf_ops
from graphserve.quantization.base import LinearMethodBase, QuantizationConfig, set_weight_attrs

# A stacked layer's checkpoint shards, in `output_sizes` order.
_SHARD_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class GGUFConfig(QuantizationConfig):
    """`tensor_types`: HF tensor name ("model.layers.0.self_attn.q_proj.weight") -> ggml type id."""

    def __init__(self, tensor_types: dict[str, int]) -> None:
        self.tensor_types = dict(tensor_types)

    @classmethod
    def get_name(cls) -> str:
        return "gguf"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        """Checks that every type is one the kernels decode; ValueError naming the tensor and its type."""
        types = config.get("tensor_types")
        if not isinstance(types, dict) or not types:
            raise ValueError("quantization config: gguf needs the file's tensor types (serve a .gguf checkpoint)")
        for name, qtype in types.items():
            if int(qtype) not in gguf_ops.GGML_TYPES:
                raise ValueError(f"GGUF tensor {name!r} has quant type {int(qtype)}, which graphserve cannot keep "
                                 f"quantized; supported: {', '.join(n for n, _, _ in gguf_ops.GGML_TYPES.values())}")
        return cls({name: int(qtype) for name, qtype in types.items()})

    def shard_types(self, prefix: str, num_shards: int) -> list[tuple[str, int]]:
        """(checkpoint name, type) of each shard of the layer named `prefix`."""
        module = prefix.rsplit(".", 1)[-1]
        stored = _SHARD_NAMES.get(module, (module,)) if num_shards > 1 else (module,)
        if len(stored) != num_shards:
            raise ValueError(f"{prefix}: {num_shards} stacked outputs, but GGUF shards are named {stored}")
        names = [f"{prefix[: len(prefix) - len(module)]}{name}.weight" for name in stored]
        missing = [name for name in names if name not in self.tensor_types]
        if missing:
            raise ValueError(f"the GGUF file has no tensor for {missing[0]!r}")
        return [(name, self.tensor_types[name]) for name in names]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        return GGUFLinearMethod(self, prefix)

    def get_embedding_method(self, prefix: str) -> GGUFEmbeddingMethod | None:
        """The method of the embedding or LM head named `prefix`; None when the file has no such tensor (a tied
        head: it takes the embedding's)."""
        qtype = self.tensor_types.get(f"{prefix}.weight")
        return None if qtype is None else GGUFEmbeddingMethod(qtype)


class GGUFLinearMethod(LinearMethodBase):
    """One flat uint8 `weight` holding each shard's rows of blocks; `apply` runs `graphserve::gguf_gemm`."""

    def __init__(self, config: GGUFConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader) -> None:
        shards = []  # (rows, row bytes, type, byte offset)
        offset = 0
        for rows, (name, qtype) in zip(output_sizes, self.config.shard_types(self.prefix, len(output_sizes))):
            try:
                size = gguf_ops.row_bytes(qtype, input_size)
            except ValueError as e:
                raise ValueError(f"GGUF tensor {name!r}: {e}") from e
            shards.append((rows, size, qtype, offset))
            offset += rows * size
        layer.gguf_shards = shards
        # One type throughout: the shards' regions form one [N, row_bytes] matrix.
        layer.gguf_uniform = len({(size, qtype) for _, size, qtype, _ in shards}) == 1
        weight = nn.Parameter(torch.empty(offset, dtype=torch.uint8), requires_grad=False)

        def load_shard(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            """Copy one checkpoint tensor's raw blocks [rows, row_bytes] into its shard's region."""
            rows, size, qtype, start = shards[0 if shard_id is None else layer.shard_index(shard_id)]
            if loaded.dtype != torch.uint8 or tuple(loaded.shape) != (rows, size):
                raise ValueError(f"expected the raw {gguf_ops.type_name(qtype)} blocks [{rows}, {size}] uint8, got "
                                 f"{loaded.dtype} {list(loaded.shape)}")
            param.data[start:start + rows * size].copy_(loaded.reshape(-1))

        set_weight_attrs(weight, {"weight_loader": load_shard})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        shards = layer.gguf_shards
        if layer.gguf_uniform:
            _, size, qtype, _ = shards[0]
            out = gguf_ops.gguf_gemm(x2d, layer.weight.view(-1, size), qtype)
        else:
            out = torch.cat([gguf_ops.gguf_gemm(x2d, layer.weight[start:start + rows * size].view(rows, size), qtype)
                             for rows, size, qtype, start in shards], dim=-1)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])


class GGUFEmbeddingMethod:
    """A token embedding or LM head kept in its blocks: rows gathered then dequantized; the head by `gguf_gemm`."""

    def __init__(self, qtype: int) -> None:
        self.qtype = qtype

    def create_weights(self, layer: nn.Module, num_rows: int, embedding_dim: int, num_real_rows: int) -> None:
        """`weight` [num_rows, row_bytes] uint8; the padding rows stay zero bytes, which decode to 0.0."""
        size = gguf_ops.row_bytes(self.qtype, embedding_dim)
        weight = nn.Parameter(torch.empty(num_rows, size, dtype=torch.uint8), requires_grad=False)

        def load_table(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            if loaded.dtype != torch.uint8 or tuple(loaded.shape) != (num_real_rows, size):
                raise ValueError(f"expected the raw {gguf_ops.type_name(self.qtype)} blocks [{num_real_rows}, {size}] "
                                 f"uint8, got {loaded.dtype} {list(loaded.shape)}")
            param.data[:num_real_rows].copy_(loaded)
            param.data[num_real_rows:].zero_()

        set_weight_attrs(weight, {"weight_loader": load_table})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing to repack: the kernels read the file's blocks."""

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, embedding_dim] in `dtype`."""
        return gguf_ops.gguf_dequantize(layer.weight.index_select(0, input_ids), self.qtype, layer.embedding_dim,
                                        dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = gguf_ops.gguf_gemm(x, layer.weight, self.qtype)
        return out if bias is None else out + bias

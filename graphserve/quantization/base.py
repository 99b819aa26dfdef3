"""The quantization seam, in vLLM's shape: a `QuantizationConfig` read from the checkpoint, and a
`LinearMethodBase` per linear layer that creates its parameters, checks the checkpoint's tensors, repacks them
once loaded and applies the GEMM.

A method never imports the layers: a linear layer calls `quant_config.get_quant_method(layer, prefix)` and
then the method's hooks, and the model's loader calls `checkpoint_tensor_shapes` on the header of every
checkpoint file before any weight is allocated on the device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Attach loader metadata (`weight_loader`, `output_dim`, `packed_dim`, `pack_factor`, ...) to a parameter."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise AttributeError(f"overwriting existing tensor attribute {key!r}")
        setattr(param, key, value)


class LinearMethodBase(ABC):
    """How a linear layer stores and applies its weights (unquantized, or a quantization scheme)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        """Register the layer's parameters on `layer` for an input of `input_size` and stacked outputs
        `output_sizes` (one per checkpoint shard: q/k/v, gate/up, or a single one).

        Each parameter carries `weight_loader` and the attributes it reads: `output_dim` (the dim the shards
        are stacked along; absent when every shard holds the same tensor, like g_idx) and, for a dim packed
        several values to an int32, `packed_dim` and `pack_factor`.
        """

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T (+ bias)` for x [num_tokens, input_size] -> [num_tokens, output_size]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded checkpoint tensors into what `apply` reads (once, on the device)."""

    def checkpoint_tensor_shapes(self, input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
        """The tensors one checkpoint projection of this size must hold, by name suffix ("qweight", ...),
        with their shapes; raise ValueError when the method cannot quantize this size. Empty: nothing to
        check ahead of loading (the unquantized weight is checked as it is copied)."""
        return {}


class QuantizationConfig(ABC):
    """A quantization scheme's settings, parsed (and validated) from the checkpoint's quantization config."""

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The method's name, as `--quantization` and `quant_method` spell it."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Parse a checkpoint's quantization config; ValueError naming the field for an unsupported value."""

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        """Files beside config.json that may hold the config (older checkpoints)."""
        return []

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method for the linear layer named `prefix`, or None to keep it unquantized."""

    def get_embedding_method(self, prefix: str) -> Any:
        """The method of the token embedding or LM head named `prefix` (`create_weights`, `embedding`, `apply`), or
        None to keep it dense (every method but GGUF)."""
        return None

"""GPTQ (AutoGPTQ / GPTQModel / optimum checkpoints, formats.md §2): 2, 3, 4 or 8 bits, groups, act-order.

Checkpoint tensors per projection: `qweight` [K*b/32, N] int32 (packed along K; 3 bits: 32 values per 3
words), `qzeros` [K/G, N*b/32] int32 (packed along N), `scales` [K/G, N] fp16, `g_idx` [K] int32. Zero points
are stored minus one in the v1 format ("gptq") and as they are in v2 ("gptq_v2").

With act-order (`desc_act`) `g_idx` is not monotonic. At load the rows are sorted by group (exllama's
reordering), so groups become contiguous and the GEMM reads x's columns in that order (`perm`). Without it,
`g_idx` is k // G and is not read.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.quantization.base import LinearMethodBase, QuantizationConfig
from graphserve.quantization.grouped import GroupedLinearMethod, add_param, group_rows, validate_group_size
from graphserve.quantization.packing import unpack_3bit, unpack_sequential

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig(QuantizationConfig):
    """GPTQ settings: bits, group size, act-order and the zero-point convention of the checkpoint format."""

    def __init__(self, bits: int, group_size: int, desc_act: bool = False, checkpoint_format: str = "gptq"):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization config: GPTQ bits={bits} is not supported; choose one of "
                             f"{list(SUPPORTED_BITS)}")
        validate_group_size(group_size)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization config: checkpoint_format={checkpoint_format!r} is not supported; "
                             f"choose one of {list(CHECKPOINT_FORMATS)} (Marlin-repacked checkpoints have "
                             "another layout)")
        self.bits = bits
        self.group_size = group_size
        self.desc_act = desc_act
        self.checkpoint_format = checkpoint_format

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        """AutoGPTQ's quantize_config.json."""
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        """Read `bits`/`w_bit`, `group_size`/`q_group_size`, `desc_act`, `checkpoint_format`; refuse what would
        be served wrongly (Marlin layouts, a quantized lm_head, per-module overrides)."""
        if config.get("is_marlin_format"):
            raise ValueError("quantization config: is_marlin_format=true (a Marlin-repacked GPTQ checkpoint) is "
                             "not supported")
        if config.get("lm_head"):
            raise ValueError("quantization config: lm_head=true (a quantized LM head) is not supported")
        if config.get("dynamic"):
            raise ValueError("quantization config: per-module overrides ('dynamic') are not supported")
        bits = config.get("bits", config.get("w_bit"))
        group_size = config.get("group_size", config.get("q_group_size", -1))
        if bits is None:
            raise ValueError("quantization config: GPTQ needs bits")
        return cls(int(bits), int(group_size), bool(config.get("desc_act", False)),
                   str(config.get("checkpoint_format", "gptq")))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """Every linear layer of the decoder is quantized."""
        return GPTQLinearMethod(self, prefix)


class GPTQLinearMethod(GroupedLinearMethod):
    """Creates GPTQ's four tensors, then unpacks, reorders for act-order and repacks them."""

    def __init__(self, config: GPTQConfig, prefix: str) -> None:
        super().__init__(config.group_size, prefix)
        self.config = config

    def checkpoint_tensor_shapes(self, input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
        """qweight [K*b/32, N], qzeros [K/G, N*b/32], scales [K/G, N], g_idx [K]."""
        bits = self.config.bits
        for what, size in (("input", input_size), ("output", output_size)):
            if size * bits % 32 or (bits == 3 and size % 32):
                raise ValueError(f"{self.prefix}: the {what} size {size} does not fill whole {bits}-bit words")
        groups = group_rows(input_size, self.group_size, self.prefix)
        return {"qweight": (input_size * bits // 32, output_size), "qzeros": (groups, output_size * bits // 32),
                "scales": (groups, output_size), "g_idx": (input_size,)}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader) -> None:
        """The checkpoint's tensors, stacked along the output for q/k/v and gate/up."""
        from fractions import Fraction

        for size in output_sizes:
            self.checkpoint_tensor_shapes(input_size, size)
        bits, n = self.config.bits, sum(output_sizes)
        groups = group_rows(input_size, self.group_size, self.prefix)
        add_param(layer, "qweight", (input_size * bits // 32, n), torch.int32,
                  {"output_dim": 1, "weight_loader": weight_loader})
        add_param(layer, "qzeros", (groups, n * bits // 32), torch.int32,
                  {"output_dim": 1, "packed_dim": 1, "pack_factor": Fraction(32, bits), "weight_loader": weight_loader})
        add_param(layer, "scales", (groups, n), torch.float16, {"output_dim": 1, "weight_loader": weight_loader})
        add_param(layer, "g_idx", (input_size,), torch.int32, {"weight_loader": weight_loader})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Unpack codes and zeros (v1: stored zero + 1), sort act-order rows by group, repack along K."""
        bits = self.config.bits
        if bits == 3:
            codes, zeros = unpack_3bit(layer.qweight.data, 0), unpack_3bit(layer.qzeros.data, 1)
        else:
            codes, zeros = unpack_sequential(layer.qweight.data, bits, 0), unpack_sequential(layer.qzeros.data, bits, 1)
        if self.config.checkpoint_format == "gptq":
            # v1 stores zero - 1; a zero of 0 was stored as -1, all ones in its field, which + 1 wraps back to 0.
            zeros = (zeros + 1) & ((1 << bits) - 1)
        perm = None
        if self.config.desc_act:
            perm = self._act_order_permutation(layer.g_idx.data, codes.shape[0], layer.scales.shape[0])
        if perm is not None:
            codes = codes.index_select(0, perm)
        self.finish_loading(layer, codes, zeros, layer.scales.data, bits, perm)

    def _act_order_permutation(self, g_idx: torch.Tensor, input_size: int, num_groups: int) -> torch.Tensor | None:
        """The row order that makes groups contiguous (None when they already are); every group must hold the
        same number of rows, which GPTQ's act-order produces."""
        g_idx = g_idx.long()
        group_size = input_size // num_groups
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
            raise ValueError(f"{self.prefix}.g_idx holds group indices outside [0, {num_groups})")
        perm = torch.argsort(g_idx, stable=True)
        expected = torch.arange(input_size, device=g_idx.device) // group_size
        if not torch.equal(g_idx[perm], expected):
            raise ValueError(f"{self.prefix}.g_idx: act-order groups of unequal size are not supported")
        if torch.equal(perm, torch.arange(input_size, device=g_idx.device)):
            return None
        return perm

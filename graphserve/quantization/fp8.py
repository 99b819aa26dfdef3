"""FP8 W8A8 (formats.md §4.3): e4m3 weights with fp32 scales, activations quantized per token (dynamic) or with a
static checkpoint scale, multiplied by `graphserve::fp8_scaled_mm` (cuBLASLt on GPUs with FP8, the reference on
the CPU).

Two sources:
- a bf16/fp16/fp32 checkpoint with `--quantization fp8` ("online"): each projection is loaded in the model dtype,
  then quantized with one scale per output channel;
- an FP8 checkpoint: HF `quant_method: "fp8"` (per-tensor `weight_scale` per shard, `input_scale` when
  `activation_scheme` is static) or compressed-tensors `float-quantized` (per-tensor or per-channel
  `weight_scale`). Per-shard scalars fill their shard's rows of the per-channel scale, so fused q/k/v and
  gate/up are exact without requantizing to the largest scale.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphserve.ops import fp8 as fp8_ops
from graphserve.platforms import current_platform
from graphserve.quantization.base import LinearMethodBase, QuantizationConfig, set_weight_attrs

ACTIVATION_SCHEMES = ("dynamic", "static")


class Fp8Config(QuantizationConfig):
    """FP8 settings: serialized or quantized at load, the activation scheme, the modules kept unquantized."""

    def __init__(self, is_checkpoint_fp8_serialized: bool, activation_scheme: str = "dynamic",
                 ignored_layers: list[str] | None = None) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"quantization config: activation_scheme={activation_scheme!r} is not supported; use "
                             f"one of {ACTIVATION_SCHEMES}")
        if activation_scheme == "static" and not is_checkpoint_fp8_serialized:
            raise ValueError("quantization config: a static activation scheme needs input scales from an FP8 "
                             "checkpoint; quantizing at load uses dynamic scales")
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers or [])

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        """`quant_method` ("fp8": serialized; "fp8-online": quantize at load), `activation_scheme`,
        `ignored_layers` / `modules_to_not_convert`; block-wise `weight_block_size` is refused."""
        if config.get("weight_block_size") is not None:
            raise ValueError(f"quantization config: weight_block_size={config['weight_block_size']} (block-wise "
                             "FP8) is not supported; per-tensor and per-channel scales are")
        serialized = not config.get("online", False)
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert")
        return cls(serialized, str(config.get("activation_scheme", "dynamic")), ignored)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if any(name in prefix for name in self.ignored_layers):
            return None
        return Fp8LinearMethod(self, prefix)


class Fp8LinearMethod(LinearMethodBase):
    """Creates the FP8 tensors (or the dense weight, when quantizing at load) and applies the scaled GEMM."""

    def __init__(self, config: Fp8Config, prefix: str) -> None:
        self.config = config
        self.prefix = prefix

    def checkpoint_tensor_shapes(self, input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
        """An FP8 checkpoint's weight [N, K] (its scales' shapes vary with the strategy: checked as loaded)."""
        return {"weight": (output_size, input_size)} if self.config.is_checkpoint_fp8_serialized else {}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader) -> None:
        n = sum(output_sizes)
        serialized = self.config.is_checkpoint_fp8_serialized
        weight = nn.Parameter(torch.empty(n, input_size, dtype=fp8_ops.FP8_DTYPE if serialized else params_dtype),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)
        if not serialized:
            return
        offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes) + 1)]

        def load_weight_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            """A per-tensor scalar fills its shard's rows; a per-channel [rows] or [rows, 1] tensor is copied."""
            index = 0 if shard_id is None else layer.shard_index(shard_id)
            rows = param.data[offsets[index]:offsets[index + 1]]
            if loaded.numel() == 1:
                rows.fill_(float(loaded.reshape(()).float()))
            elif loaded.numel() == rows.numel():
                rows.copy_(loaded.reshape(-1).float())
            else:
                raise ValueError(f"weight_scale of shape {list(loaded.shape)} is neither per-tensor nor per-channel "
                                 f"for {rows.numel()} output rows")

        scale = nn.Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"weight_loader": load_weight_scale})
        layer.register_parameter("weight_scale", scale)
        if self.config.activation_scheme == "static":

            def load_input_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
                if loaded.numel() != 1:
                    raise ValueError(f"input_scale must be one number, got shape {list(loaded.shape)}")
                param.data[0 if shard_id is None else layer.shard_index(shard_id)] = float(loaded.reshape(()))

            input_scale = nn.Parameter(torch.empty(len(output_sizes), dtype=torch.float32), requires_grad=False)
            set_weight_attrs(input_scale, {"weight_loader": load_input_scale})
            layer.register_parameter("input_scale", input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantize a dense weight per output channel (online), or keep the checkpoint's; one static input scale
        (the largest shard's); check that the device can run FP8."""
        device = layer.weight.device
        if device.type != "cpu" and not current_platform().supports_fp8_gemm(device):
            raise ValueError(f"{self.prefix}: FP8 weights need FP8 tensor cores (NVIDIA compute capability >= 8.9; "
                             "ROCm not supported yet); serve a bf16 checkpoint without --quantization fp8 here")
        frozen = {"requires_grad": False}
        if not self.config.is_checkpoint_fp8_serialized:
            weight = layer.weight.data
            scale = fp8_ops.per_channel_scales(weight)
            layer.weight = nn.Parameter(fp8_ops.quantize_fp8(weight, scale[:, None]), **frozen)
            layer.weight_scale = nn.Parameter(scale, **frozen)
        else:
            scale = layer.weight_scale.data
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise ValueError(f"{self.prefix}.weight_scale: FP8 weight scales must be finite and positive")
            layer.weight_scale = nn.Parameter(scale.contiguous(), **frozen)
        input_scale = getattr(layer, "input_scale", None)
        layer.fp8_input_scale = None
        if input_scale is not None:
            layer.fp8_input_scale = nn.Parameter(input_scale.data.max().reshape(1), **frozen)
            del layer.input_scale

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_ops.fp8_linear(x, layer.weight, layer.weight_scale, layer.fp8_input_scale, bias)


class CompressedTensorsConfig(Fp8Config):
    """compressed-tensors checkpoints of the FP8 W8A8 scheme (`format: float-quantized`): 8-bit float weights with
    tensor or channel scales, token (dynamic) or tensor (static) activation scales. Other schemes are refused."""

    @classmethod
    def get_name(cls) -> str:
        return "compressed-tensors"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = config.get("config_groups") or {}
        if not groups:
            raise ValueError("quantization config: compressed-tensors without config_groups")
        schemes = set()
        for name, group in groups.items():
            weights = group.get("weights") or {}
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise ValueError(f"quantization config: compressed-tensors group {name!r} is not FP8 W8A8 (weights "
                                 f"{weights.get('type')} {weights.get('num_bits')}-bit); only float-quantized "
                                 "checkpoints are supported")
            if weights.get("strategy", "tensor") not in ("tensor", "channel"):
                raise ValueError(f"quantization config: compressed-tensors weight strategy "
                                 f"{weights.get('strategy')!r} is not supported (tensor or channel)")
            activations = group.get("input_activations")
            if not activations:
                raise ValueError(f"quantization config: compressed-tensors group {name!r} has FP8 weights without "
                                 "input_activations (weight-only FP8) and is not supported; W8A8 is")
            dynamic = bool(activations.get("dynamic", True))
            strategy = activations.get("strategy", "token" if dynamic else "tensor")
            if (dynamic, strategy) not in ((True, "token"), (False, "tensor")):
                kind = "dynamic" if dynamic else "static"
                raise ValueError(f"quantization config: compressed-tensors activations {kind} per {strategy} are "
                                 "not supported (dynamic per token or static per tensor)")
            schemes.add("dynamic" if dynamic else "static")
        if len(schemes) != 1:
            raise ValueError("quantization config: compressed-tensors groups mix dynamic and static activations")
        return cls(True, schemes.pop(), config.get("ignore"))

"""Quantized checkpoints: a registry of methods (AWQ, GPTQ, SqueezeLLM, FP8, compressed-tensors FP8, GGUF blocks),
read from the checkpoint or forced with `--quantization` (`fp8` also quantizes an unquantized checkpoint at load);
`base` holds the seam (`QuantizationConfig`, `LinearMethodBase`), `packing` the formats' bit layouts, `grouped` what
AWQ and GPTQ share once loaded.

This module imports no torch: the engine's config resolution reads and validates the method before anything
is built.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphserve.config import ModelConfig
    from graphserve.quantization.base import QuantizationConfig

# name -> "module:Class", imported only when used.
QUANTIZATION_METHODS: dict[str, str] = {
    "awq": "graphserve.quantization.awq:AWQConfig",
    "gptq": "graphserve.quantization.gptq:GPTQConfig",
    "squeezellm": "graphserve.quantization.squeezellm:SqueezeLLMConfig",
    "fp8": "graphserve.quantization.fp8:Fp8Config",
    "compressed-tensors": "graphserve.quantization.fp8:CompressedTensorsConfig",
    "gguf": "graphserve.quantization.gguf:GGUFConfig",
}
# ggml types that are plain floats (a GGUF of only these has nothing to keep quantized).
_GGUF_FLOAT_TYPES = {0, 1, 30}
# Methods that quantize an unquantized checkpoint while loading it (`--quantization fp8` on a bf16 checkpoint).
ONLINE_METHODS = {"fp8": {"quant_method": "fp8", "online": True, "activation_scheme": "dynamic"}}
# Files beside config.json that older checkpoints keep their quantization config in, and what they imply.
_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


def get_quantization_config_cls(name: str) -> type[QuantizationConfig]:
    """The config class of method `name`; ValueError naming the supported ones."""
    target = QUANTIZATION_METHODS.get(name.lower())
    if target is None:
        raise ValueError(f"quantization method {name!r} is not supported; choose one of "
                         f"{sorted(QUANTIZATION_METHODS)}")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _read_checkpoint_config(model_dir: str, hf_config: Any) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's quantization config and where it was found (config.json first, then the legacy files)."""
    config = getattr(hf_config, "quantization_config", None)
    if config is not None:
        return dict(config if isinstance(config, dict) else config.to_dict()), "config.json:quantization_config"
    for name in _CONFIG_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f), name
    return None, ""


def _method_of(config: dict[str, Any]) -> str | None:
    """The method a config describes: `quant_method` where it says, else recognised by its fields."""
    method = config.get("quant_method")
    if method is not None:
        return str(method).lower()
    if "wbits" in config:
        return "squeezellm"
    if "w_bit" in config or "zero_point" in config or "version" in config:
        return "awq"
    if "bits" in config or "desc_act" in config:
        return "gptq"
    return None


def resolve_quantization(
    model_dir: str, hf_config: Any, forced: str | None, load_format: str
) -> tuple[str | None, dict[str, Any] | None]:
    """(method, its config) for a checkpoint: read from its files, checked against `--quantization`, validated.

    A dummy model (random weights) takes the forced method with default settings: 4 bits, groups of 128.
    Raises ValueError naming the field or the mismatch, before any weight is read.
    """
    if forced is not None:
        get_quantization_config_cls(forced)  # a name we serve at all
        if forced.lower() == "gguf":
            raise ValueError(f"--quantization gguf needs a .gguf checkpoint; {model_dir} is not one")
    config, source = _read_checkpoint_config(model_dir, hf_config) if load_format != "gguf" else (None, "")
    if config is None:
        if forced is None:
            return None, None
        if forced.lower() in ONLINE_METHODS:
            return forced.lower(), dict(ONLINE_METHODS[forced.lower()])
        if load_format != "dummy":
            raise ValueError(f"--quantization {forced} was given, but the checkpoint in {model_dir} has no "
                             "quantization config (config.json:quantization_config, quantize_config.json or "
                             "quant_config.json)")
        config = {"quant_method": forced.lower(), "bits": 4, "wbits": 4, "group_size": 128}
        source = "defaults for dummy weights"
    method = _method_of(config)
    if method is None:
        raise ValueError(f"{source} does not name its quantization method (quant_method)")
    if forced is not None and forced.lower() != method:
        raise ValueError(f"--quantization {forced} was given, but the checkpoint is quantized with {method} "
                         f"({source})")
    get_quantization_config_cls(method).from_config(config)  # validates every field now
    return method, config


def resolve_gguf_quantization(
    tensor_types: dict[str, int], forced: str | None, keep_by_default: bool
) -> tuple[str | None, dict[str, Any] | None]:
    """(method, config) for a GGUF file whose kept tensors have `tensor_types` ({HF name: ggml type}).

    `--quantization gguf` keeps the blocks (also on the CPU, where the reference is slow); no flag keeps them when
    `keep_by_default` (a GPU platform) and the file has quantized tensors, else they are dequantized at load;
    `fp8` quantizes the dequantized weights again. Other methods do not apply to a GGUF file.
    """
    name = forced.lower() if forced is not None else None
    if name is not None and name != "gguf":
        if name in ONLINE_METHODS:
            return name, dict(ONLINE_METHODS[name])
        get_quantization_config_cls(name)
        raise ValueError(f"--quantization {forced} was given, but the checkpoint is a GGUF file (its own quant "
                         "types); use --quantization gguf or leave it out")
    quantized = any(qtype not in _GGUF_FLOAT_TYPES for qtype in tensor_types.values())
    if name is None and not (keep_by_default and quantized):
        return None, None
    config = {"quant_method": "gguf", "tensor_types": dict(tensor_types)}
    get_quantization_config_cls("gguf").from_config(config)  # every type decodable, named otherwise
    return "gguf", config


def get_quant_config(model_config: ModelConfig) -> QuantizationConfig | None:
    """The model's quantization config object (None for an unquantized model)."""
    if model_config.quantization is None:
        return None
    return get_quantization_config_cls(model_config.quantization).from_config(model_config.quantization_config)

"""Build a model without allocating twice (meta device, then one allocation on the target) and fill it."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from graphserve.config import ModelConfig
from graphserve.layers.linear import LinearBase
from graphserve.models.registry import resolve_model_cls


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily change torch's default dtype (parameters are created in the model dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def get_model(model_config: ModelConfig, device: torch.device | str) -> nn.Module:
    """Instantiate the architecture on `device` in the model dtype and load its weights."""
    device = torch.device(device)
    model_cls = resolve_model_cls(model_config.architecture)
    with set_default_dtype(getattr(torch, model_config.dtype)), torch.device("meta"):
        model = model_cls(model_config)
    if model_config.quantization is not None and model_config.load_format == "safetensors":
        check_quantized_checkpoint(model, model_config)  # before any allocation on the device
    # Parameters exist only as shapes so far; allocate each once, on the target device.
    materialize_meta_module(model, device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    load_weights(model, model_config)
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(module)
    model.requires_grad_(False)
    return model.eval()


def checkpoint_linear_shards(model: nn.Module) -> Iterator[tuple[str, LinearBase, int]]:
    """(checkpoint name prefix, layer, output size) of every projection the checkpoint stores for a linear layer:
    one per shard of a stacked layer (q/k/v, gate/up), by the model's `stacked_params_mapping`."""
    mapping = getattr(model, "stacked_params_mapping", [])
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        shards = [(name[: -len(fused)] + stored, module.output_sizes[module.shard_index(shard_id)])
                  for fused, stored, shard_id in mapping if name.endswith(fused)]
        for prefix, size in shards or [(name, module.output_size)]:
            yield prefix, module, size


def check_quantized_checkpoint(model: nn.Module, model_config: ModelConfig) -> None:
    """Every tensor the quantization method needs is in the checkpoint with its expected shape (read from the
    file headers alone), so a wrong or truncated checkpoint fails naming the tensor before any weight is loaded."""
    from graphserve.models.weight_utils import find_safetensors_files, safetensors_shapes

    shapes = safetensors_shapes(find_safetensors_files(model_config.model))
    method = model_config.quantization
    for prefix, layer, output_size in checkpoint_linear_shards(model):
        expected = layer.quant_method.checkpoint_tensor_shapes(layer.input_size, output_size)
        for suffix, shape in expected.items():
            name = f"{prefix}.{suffix}"
            if name not in shapes:
                raise ValueError(f"checkpoint {model_config.model} has no tensor {name!r}, which {method} needs")
            if shapes[name] != shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {list(shapes[name])}; {method} with this "
                                 f"config expects {list(shape)} for a {layer.input_size} -> {output_size} "
                                 "projection")


@torch.no_grad()
def materialize_meta_module(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized) storage for every meta parameter and buffer, like `Module.to_empty`.

    Unlike `to_empty`, which re-creates Parameters when leaving the meta device, this keeps each
    Parameter's attributes (`weight_loader`, `output_dim`, ...) and keeps tied parameters tied: a
    Parameter shared by several modules is materialized once and shared again.
    """
    materialized: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in materialized:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                new.__dict__.update(param.__dict__)
                materialized[id(param)] = new
            module._parameters[name] = materialized[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def load_weights(model: nn.Module, model_config: ModelConfig) -> None:
    """Fill every parameter from the configured source; fail naming any parameter left unset."""
    if model_config.load_format == "dummy":
        from graphserve.models.weight_utils import initialize_dummy_weights

        initialize_dummy_weights(model, seed=model_config.seed)
        return
    with torch.no_grad():
        loaded = model.load_weights(_iterate_weights(model_config))
    missing = sorted(set(name for name, _ in model.named_parameters()) - loaded)
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(f"Checkpoint {model_config.model} did not provide these parameters: {shown}")


def _iterate_weights(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if model_config.load_format == "gguf":
        from graphserve.models.gguf_loader import gguf_weights_iterator

        path = os.path.join(model_config.model, model_config.gguf_file)
        return gguf_weights_iterator(path, model_config.hf_config, keep_quantized=model_config.quantization == "gguf")
    if model_config.load_format in ("safetensors", "auto"):
        from graphserve.models.weight_utils import find_safetensors_files, safetensors_weights_iterator

        return safetensors_weights_iterator(find_safetensors_files(model_config.model))
    raise ValueError(f"Unknown load_format {model_config.load_format!r}")

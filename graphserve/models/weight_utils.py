"""Checkpoint discovery and tensor iteration (safetensors only), plus dummy weight initialization."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Pickle-based formats: unpickling a model file can execute arbitrary code, so we never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Loader for parameters without their own (norms): copy the whole tensor, shapes must match."""
    if shard_id is not None:
        raise ValueError(f"parameter without a weight_loader got shard_id {shard_id!r}")
    if param.shape != loaded_weight.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def find_safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files (index-listed shards, the single file, or any *.safetensors)."""
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, name) for name in shard_names]
        missing = [name for name, path in zip(shard_names, files) if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"{SAFETENSORS_INDEX} in {model_dir} lists missing shard files: {missing}")
        return files
    single = os.path.join(model_dir, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = sorted(name for name in os.listdir(model_dir) if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}). graphserve refuses to load them "
            "because unpickling can execute code from the model files. Convert the weights to safetensors "
            "(e.g. load with transformers and call save_pretrained(dir, safe_serialization=True))."
        )
    raise ValueError(f"No safetensors weights (model.safetensors or {SAFETENSORS_INDEX}) found in {model_dir}")


def safetensors_weights_iterator(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, so peak host memory stays at one tensor."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def safetensors_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the files, read from their headers (no tensor data)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Fill every floating parameter with seeded uniform noise in [low, high), and every integer one (packed
    quantized codes) with random bits.

    The range is small so that activations stay finite in half precision. Values are drawn in float32 on the
    parameter's own device: drawing 8 B values on the host took 46 s of a Llama-3-8B start-up on the H200.
    A seed therefore gives the same model on every run of one device type, not across device types.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        if torch.is_floating_point(param):
            noise = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            param.data.copy_(noise.uniform_(low, high, generator=gen))
        elif param.dtype == torch.int32:
            param.data.random_(-(1 << 31), (1 << 31) - 1, generator=gen)


# Checkpoint names of FP8 KV cache scales (formats.md §4.2), by suffix: -> (suffix to strip, which scale).
_KV_SCALE_SUFFIXES = (
    (".self_attn.attn.k_scale", ".attn.k_scale", "k"), (".self_attn.attn.v_scale", ".attn.v_scale", "v"),
    (".self_attn.k_proj.output_scale", ".k_proj.output_scale", "k"),
    (".self_attn.v_proj.output_scale", ".v_proj.output_scale", "v"),
    (".self_attn.k_proj.k_scale", ".k_proj.k_scale", "k"), (".self_attn.v_proj.v_scale", ".v_proj.v_scale", "v"),
    (".self_attn.k_scale", ".k_scale", "k"), (".self_attn.v_scale", ".v_scale", "v"),
    (".self_attn.kv_scale", ".kv_scale", "kv"),  # AutoFP8's single scale: both
)


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """(the self_attn module path, "k" | "v" | "kv") when `name` is a KV cache scale, else None."""
    for suffix, strip, which in _KV_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(strip)], which
    return None

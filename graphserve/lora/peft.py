"""PEFT LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors`, read and checked against
the model before anything is scheduled (formats.md §5.1-5.2).

Each adapter tensor `base_model.model.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r] is mapped onto
the engine's fused projections: q/k/v_proj are the slices 0/1/2 of `qkv_proj`, gate/up_proj the slices 0/1 of
`gate_up_proj`, o_proj and down_proj one slice each. Whatever the engine cannot serve is refused with the tensor
or field named, never ignored (an adapter whose names do not match the model must not silently give base-model
output): `.bin` files, DoRA, LoRA biases, embedding / lm_head LoRA and `modules_to_save` copies, ranks above
`max_lora_rank`, modules the model does not have.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from graphserve.config import LoRAConfig, ModelConfig
from graphserve.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT module name -> (engine module, slice)
SLICES = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class ModuleShape:
    """What an engine module accepts: its input size and the output size of each slice."""

    input_size: int
    output_sizes: tuple[int, ...]


@dataclass
class LoRAModel:
    """One adapter on the host: per engine module, per slice, (A [r, in], B [out, r] times the scaling)."""

    request: LoRARequest
    rank: int  # the largest rank of any module
    modules: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return self.request.lora_int_id


def _fail(request: LoRARequest, message: str) -> ValueError:
    return ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): {message}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(request: LoRARequest) -> dict[str, Any]:
    """The adapter's config, with every field the engine cannot honour refused."""
    path = request.lora_path
    if not os.path.isdir(path):
        raise _fail(request, "not a directory")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise _fail(request, f"{CONFIG_FILE} is missing")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(request, f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(request, f"{CONFIG_FILE} must hold a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise _fail(request, f"peft_type {config.get('peft_type')!r} is not LORA")
    for name in ("r", "lora_alpha"):
        value = config.get(name, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _fail(request, f"{name} must be a positive number, got {value!r}")
    if config.get("use_dora"):
        raise _fail(request, "use_dora: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise _fail(request, f"bias={config.get('bias')!r}: LoRA biases are not supported (only 'none')")
    if config.get("modules_to_save"):
        raise _fail(request, f"modules_to_save={config['modules_to_save']!r}: full copies of modules (lm_head, "
                             "embeddings) are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in SLICES)
        if unknown:
            raise _fail(request, f"target_modules {unknown} are not LoRA-capable modules of this model "
                                 f"(supported: {sorted(SLICES)})")
    return config


def _weights_file(request: LoRARequest) -> str:
    path = os.path.join(request.lora_path, WEIGHTS_FILE)
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(request.lora_path, "adapter_model.bin")):
        raise _fail(request, "adapter_model.bin (pickle) is refused like .bin models; save the adapter with "
                             "safetensors (peft's default) or convert it")
    raise _fail(request, f"{WEIGHTS_FILE} is missing")


def load_lora_model(
    request: LoRARequest, max_lora_rank: int, module_shapes: dict[str, ModuleShape], load_tensors: bool = True,
) -> LoRAModel:
    """Read and check an adapter against the model's LoRA-capable modules (`module_shapes`, by engine module name).

    With `load_tensors=False` only the file headers are read (the engine's check before it queues a request).
    Raises ValueError naming the tensor or field at the first problem.
    """
    from safetensors import safe_open

    config = read_adapter_config(request)
    weights_path = _weights_file(request)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    pairs: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
                match = _TENSOR.match(name)
                if match is None:
                    raise _fail(request, f"tensor {key!r} is not a LoRA A/B weight of a linear layer (embedding / "
                                         "lm_head LoRA and saved full modules are not supported)")
                module, which = match["module"], match["which"]
                parent, _, leaf = module.rpartition(".")
                if leaf not in SLICES:
                    raise _fail(request, f"tensor {key!r} targets {leaf!r}, which is not a LoRA-capable module "
                                         f"(supported: {sorted(SLICES)})")
                fused, index = SLICES[leaf]
                target = f"{parent}.{fused}" if parent else fused
                if target not in module_shapes:
                    raise _fail(request, f"tensor {key!r} targets module {module!r}, which the model does not have")
                shape = tuple(f.get_slice(key).get_shape())
                value = f.get_tensor(key) if load_tensors else None
                pairs.setdefault((target, index), {"module": module})[which] = (key, shape, value)
    except ValueError:
        raise
    except Exception as e:  # a truncated or corrupt file: safetensors' own errors
        raise _fail(request, f"cannot read {WEIGHTS_FILE} ({type(e).__name__}: {e})") from None
    if not pairs:
        raise _fail(request, f"{WEIGHTS_FILE} holds no LoRA tensors")
    model = LoRAModel(request, rank=0)
    for (target, index), entry in sorted(pairs.items()):
        module = entry["module"]
        for which in ("lora_A", "lora_B"):
            if which not in entry:
                raise _fail(request, f"{module}.{which}.weight is missing (LoRA needs both A and B)")
        (key_a, shape_a, a), (key_b, shape_b, b) = entry["lora_A"], entry["lora_B"]
        expected = module_shapes[target]
        rank = int(_pattern_value(rank_pattern, module, config.get("r", 8)))
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            raise _fail(request, f"{key_a} {list(shape_a)} and {key_b} {list(shape_b)} are not a rank-r pair")
        if shape_a[0] != rank:
            raise _fail(request, f"{key_a} has rank {shape_a[0]} but the config says r={rank}")
        if rank > max_lora_rank:
            raise _fail(request, f"{key_a} has rank {rank}, above max_lora_rank={max_lora_rank}")
        if shape_a[1] != expected.input_size or shape_b[0] != expected.output_sizes[index]:
            raise _fail(request, f"{key_a} {list(shape_a)} / {key_b} {list(shape_b)} do not fit {module} "
                                 f"(input {expected.input_size}, output {expected.output_sizes[index]})")
        model.rank = max(model.rank, rank)
        if load_tensors:
            alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise _fail(request, f"{key_a} or {key_b} holds NaN or infinite values")
            model.modules.setdefault(target, {})[index] = (a.float(), b.float() * scaling)
    return model


def decoder_module_shapes(model_config: ModelConfig) -> dict[str, ModuleShape]:
    """The LoRA-capable modules of a Llama-family decoder, from its config alone (the engine checks adapters
    with these before queueing a request; the worker checks them against the model it built)."""
    hf = model_config.hf_config
    hidden, inter = hf.hidden_size, hf.intermediate_size
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = model_config.head_dim
    shapes = {}
    for i in range(hf.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.self_attn.qkv_proj"] = ModuleShape(hidden, (heads * head_dim, kv_heads * head_dim,
                                                                      kv_heads * head_dim))
        shapes[f"{prefix}.self_attn.o_proj"] = ModuleShape(heads * head_dim, (hidden,))
        shapes[f"{prefix}.mlp.gate_up_proj"] = ModuleShape(hidden, (inter, inter))
        shapes[f"{prefix}.mlp.down_proj"] = ModuleShape(inter, (hidden,))
    return shapes


class AdapterRegistry:
    """The engine's check of the adapters requests name, before anything is queued: each adapter's headers are
    read once against the model's modules, and an engine id keeps meaning one adapter."""

    def __init__(self, model_config: ModelConfig, lora_config: LoRAConfig | None) -> None:
        self.lora_config = lora_config
        self.module_shapes = decoder_module_shapes(model_config) if lora_config is not None else {}
        self._checked: dict[int, LoRARequest] = {}

    def check(self, request: LoRARequest | None) -> None:
        """ValueError unless LoRA is on and the adapter fits the model; reads the files once per adapter."""
        if request is None:
            return
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        if self.lora_config is None:
            raise ValueError("a LoRA adapter was requested but LoRA is not enabled (start with --enable-lora / "
                             "LLM(enable_lora=True))")
        known = self._checked.get(request.lora_int_id)
        if known == request:
            return
        if known is not None:
            raise ValueError(f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} "
                             f"({known.lora_path}); use another id for {request.lora_name!r}")
        load_lora_model(request, self.lora_config.max_lora_rank, self.module_shapes, load_tensors=False)
        self._checked[request.lora_int_id] = request

    def forget(self, lora_int_id: int) -> bool:
        """Unload: the id may name another adapter later (requests already running keep theirs); False if unknown.
        """
        return self._checked.pop(lora_int_id, None) is not None

    def list(self) -> list[LoRARequest]:
        """The adapters checked so far (loaded), in id order."""
        return [self._checked[i] for i in sorted(self._checked)]

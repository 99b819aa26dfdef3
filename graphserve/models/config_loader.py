"""Resolve a model argument (directory, GGUF file, or None = default model) into a ModelConfig.

dtype "auto" follows vLLM: the checkpoint's own dtype (config `dtype` / `torch_dtype`), float32 when
the config names none (GGUF metadata). We deliberately do not downcast float32 checkpoints to a
half type here: the device is not known at this point, and on the CPU float32 is the fast, exact
choice. Pass dtype="bfloat16"/"float16" to serve a float32 checkpoint in half precision.
"""
from __future__ import annotations

import json
import os
from typing import Any

from graphserve.config import ModelConfig, normalize_dtype
from graphserve.models.registry import resolve_architecture
from graphserve.quantization import resolve_gguf_quantization, resolve_quantization

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# Config fields that hold the trained context length, most specific first.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def create_model_config(model: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                        load_format: str = "auto", seed: int = 0, tokenizer: str | None = None,
                        quantization: str | None = None, device: str = "auto") -> ModelConfig:
    """Read the checkpoint's config and validate the user's choices against it."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    model_dir, gguf_file = _resolve_model_location(model, load_format)
    if gguf_file is not None:
        from graphserve.models.gguf_loader import load_gguf_config

        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' given for the GGUF file {gguf_file}")
        hf_config = load_gguf_config(model_dir, gguf_file)
        load_format = "dummy" if load_format == "dummy" else "gguf"
    else:
        hf_config = _load_hf_config(model_dir)
        if load_format == "auto":
            load_format = "safetensors"
        if load_format == "safetensors":
            from graphserve.models.weight_utils import find_safetensors_files

            find_safetensors_files(model_dir)  # fail now (e.g. pickle-only checkpoints), not at load time
    architecture = resolve_architecture(hf_config)
    if load_format == "gguf":
        from graphserve.models.gguf_loader import gguf_tensor_types
        from graphserve.platforms import resolve_platform

        method, quant_config = resolve_gguf_quantization(gguf_tensor_types(os.path.join(model_dir, gguf_file)),
                                                         quantization, not resolve_platform(device).is_cpu())
    else:
        method, quant_config = resolve_quantization(model_dir, hf_config, quantization, load_format)
    num_heads = hf_config.num_attention_heads
    eos_token_ids, bos_token_id = _get_special_token_ids(hf_config, model_dir)
    return ModelConfig(
        model=model_dir,
        architecture=architecture,
        hf_config=hf_config,
        dtype=_resolve_dtype(dtype, hf_config),
        max_model_len=_resolve_max_model_len(max_model_len, hf_config),
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=get_head_dim(hf_config),
        tokenizer=tokenizer if tokenizer is not None else model_dir,
        gguf_file=gguf_file,
        load_format=load_format,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        sliding_window=_get_sliding_window(hf_config),
        seed=seed,
        quantization=method,
        quantization_config=quant_config,
    )


def _resolve_model_location(model: str | None, load_format: str) -> tuple[str, str | None]:
    """Return (directory, gguf file name or None)."""
    if model is None:
        from graphserve.models.default_model import get_default_model_path

        return get_default_model_path()
    model = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"{model} is a file but not a .gguf file; pass a model directory instead")
        return os.path.dirname(model), os.path.basename(model)
    if not os.path.isdir(model):
        raise ValueError(f"Model path {model} does not exist (graphserve loads local directories or GGUF files only)")
    has_config = os.path.isfile(os.path.join(model, "config.json"))
    ggufs = sorted(name for name in os.listdir(model) if name.endswith(".gguf"))
    if load_format == "gguf" or (ggufs and not has_config):
        if len(ggufs) != 1:
            raise ValueError(f"Expected exactly one .gguf file in {model}, found {ggufs}; pass the file path")
        return model, ggufs[0]
    if not has_config:
        raise ValueError(f"{model} has no config.json (and no .gguf file)")
    return model, None


def _load_hf_config(model_dir: str) -> Any:
    from transformers import AutoConfig

    # trust_remote_code stays off: executing Python from a model directory is never implied.
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def _config_dtype_name(hf_config: Any) -> str | None:
    # transformers 5 reads a config.json's `torch_dtype` into `dtype` (and warns when `torch_dtype` is
    # accessed); only transformers 4 objects lack `dtype`. The value may be a string or a torch.dtype.
    value = hf_config.dtype if hasattr(hf_config, "dtype") else getattr(hf_config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def _resolve_dtype(dtype: str, hf_config: Any) -> str:
    name = normalize_dtype(dtype)
    if name != "auto":
        return name
    config_dtype = _config_dtype_name(hf_config)
    if config_dtype is None:
        return "float32"
    try:
        return normalize_dtype(config_dtype)
    except ValueError:
        raise ValueError(f"Checkpoint dtype {config_dtype!r} is not supported; pass dtype explicitly") from None


def _rope_scaling_dict(hf_config: Any) -> dict[str, Any]:
    # transformers 5: `rope_parameters` (rope_type, factor, ...); 4.x: `rope_scaling` (type or rope_type).
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    return dict(params) if isinstance(params, dict) else {}


def _derive_max_model_len(hf_config: Any) -> int | None:
    """The trained context, stretched by context-extending RoPE scaling as vLLM does.

    linear/dynamic multiply max_position_embeddings by the factor; yarn multiplies its
    original_max_position_embeddings; llama3 and longrope configs already state the extended length.
    """
    derived = next((getattr(hf_config, key) for key in _MAX_LEN_KEYS if getattr(hf_config, key, None)), None)
    rope = _rope_scaling_dict(hf_config)
    rope_type = rope.get("rope_type") or rope.get("type")
    factor = rope.get("factor")
    if derived is None or not factor or rope_type not in ("linear", "dynamic", "yarn"):
        return derived
    if rope_type == "yarn":
        derived = rope.get("original_max_position_embeddings", derived)
    return int(derived * factor)


def _resolve_max_model_len(max_model_len: int | None, hf_config: Any) -> int:
    derived = _derive_max_model_len(hf_config)
    if max_model_len is None:
        if derived is None:
            raise ValueError(f"The model config has none of {_MAX_LEN_KEYS}; pass max_model_len explicitly")
        return int(derived)
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if derived is not None and max_model_len > derived:
        raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's maximum context length "
                         f"({derived}, from the config's max_position_embeddings and RoPE scaling)")
    return max_model_len


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _get_special_token_ids(hf_config: Any, model_dir: str) -> tuple[tuple[int, ...], int | None]:
    """EOS ids of config.json plus generation_config.json (chat models add end-of-turn ids there)."""
    eos_ids = _as_id_list(getattr(hf_config, "eos_token_id", None))
    bos_token_id = getattr(hf_config, "bos_token_id", None)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        eos_ids += _as_id_list(gen.get("eos_token_id"))
        if bos_token_id is None:
            bos_token_id = gen.get("bos_token_id")
    return tuple(dict.fromkeys(eos_ids)), bos_token_id


def get_head_dim(hf_config: Any) -> int:
    """head_dim from the config, or hidden_size / num_attention_heads when absent."""
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim) if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


def get_layer_sliding_window(hf_config: Any, layer_idx: int) -> int | None:
    """Sliding window of one layer: per `layer_types` when the config has it, else the global window."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(hf_config, "use_sliding_window", True) is False:  # Qwen-style configs written without layer_types
        return None
    return int(window)


def _get_sliding_window(hf_config: Any) -> int | None:
    """The window if any layer uses sliding attention (each layer picks its own in the model)."""
    windows = (get_layer_sliding_window(hf_config, i) for i in range(hf_config.num_hidden_layers))
    return next((w for w in windows if w is not None), None)

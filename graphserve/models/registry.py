"""Architecture name -> model class, imported lazily so that only the served family is loaded."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture (config.json "architectures") -> (module under graphserve.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    # Mistral is Llama plus a sliding window, which the Llama implementation reads from the config.
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
}

# config.model_type -> architecture, for configs without "architectures" (GGUF metadata).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "falcon": "FalconForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def get_supported_archs() -> list[str]:
    """Architectures graphserve can serve."""
    return sorted(_MODELS)


def _unsupported(what: str) -> ValueError:
    return ValueError(f"Model architecture {what} is not supported. Supported architectures: "
                      f"{', '.join(get_supported_archs())}")


def resolve_architecture(hf_config: Any) -> str:
    """Pick the first supported architecture of a HF config (falling back to its model_type)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return arch
    if not archs and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config.model_type]
    raise _unsupported(repr(archs) if archs else f"of model_type {getattr(hf_config, 'model_type', None)!r}")


def resolve_model_cls(architecture: str) -> type[nn.Module]:
    """Import and return the model class implementing `architecture`."""
    if architecture not in _MODELS:
        raise _unsupported(repr(architecture))
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"graphserve.models.{module_name}")
    return getattr(module, class_name)

"""Attention backend registry: name -> backend class (imported lazily); the platform names its default.

To add a backend: subclass `AttentionBackend` (with its builder and impl) in a module of this package and add
one line to `_BACKENDS`; `--attention-backend NAME` / `LLM(attention_backend=NAME)` then selects it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.attention.backends.base import AttentionBackend
    from graphserve.platforms.interface import Platform

# "module:Class" so that selecting a backend never imports the others (and their kernels).
_BACKENDS: dict[str, str] = {
    "PAGED_ATTN": "graphserve.attention.backends.paged:PagedAttentionBackend",
    "TORCH_SDPA": "graphserve.attention.backends.sdpa:TorchSDPABackend",
}


def backend_names() -> list[str]:
    """The registered backend names."""
    return sorted(_BACKENDS)


def validate_backend_name(name: str) -> str:
    """The canonical (upper-case) name; ValueError naming the choices when unknown."""
    canonical = name.upper()
    if canonical not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    return canonical


def get_attn_backend(name: str) -> type[AttentionBackend]:
    """The backend class registered under `name` (case-insensitive)."""
    module_name, cls_name = _BACKENDS[validate_backend_name(name)].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def select_attn_backend(platform: Platform, name: str | None = None) -> type[AttentionBackend]:
    """The explicitly requested backend, else the platform's default."""
    return get_attn_backend(name if name is not None else platform.default_attention_backend)

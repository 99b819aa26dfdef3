"""Attention backend registry: name -> backend class (imported lazily), and the default per platform."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.attention.backends.base import AttentionBackend

# "module:Class" so that selecting a backend never imports the others (and their kernels).
_BACKENDS: dict[str, str] = {
    "TORCH_REF": "graphserve.attention.backends.torch_ref:TorchRefBackend",
}
# The torch reference runs on every device through the op dispatcher; faster backends replace it per platform.
_PLATFORM_DEFAULT: dict[str, str] = {"cpu": "TORCH_REF", "cuda": "TORCH_REF", "rocm": "TORCH_REF"}


def register_backend(name: str, target: str) -> None:
    """Add a backend as "package.module:ClassName" under `name`."""
    _BACKENDS[name.upper()] = target


def get_attn_backend(name: str) -> type["AttentionBackend"]:
    """The backend class registered under `name` (case-insensitive)."""
    target = _BACKENDS.get(name.upper())
    if target is None:
        raise ValueError(f"unknown attention backend {name!r}; supported: {sorted(_BACKENDS)}")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def select_attn_backend(platform_name: str, backend: str | None = None) -> type["AttentionBackend"]:
    """The backend for a platform ("cpu", "cuda", "rocm"), or the explicitly requested one."""
    if backend is not None:
        return get_attn_backend(backend)
    name = _PLATFORM_DEFAULT.get(platform_name.lower())
    if name is None:
        raise ValueError(f"no attention backend for platform {platform_name!r}; known: {sorted(_PLATFORM_DEFAULT)}")
    return get_attn_backend(name)

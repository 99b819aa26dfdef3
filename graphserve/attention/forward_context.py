"""Per-step state read by attention layers (metadata and KV caches) without passing it through `forward`.

Keeping it out of the model's arguments means torch.compile never sees per-step metadata: the attention op
looks it up at run time, so changing batches cause no guards to fail and no recompiles.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from graphserve.attention.backends.base import AttentionMetadata


@dataclass
class ForwardContext:
    """What the attention layers of one forward pass read."""

    attn_metadata: "AttentionMetadata | None"  # None = profiling/dummy run: plain causal attention, cache untouched
    kv_caches: Sequence[tuple["torch.Tensor", "torch.Tensor"]]  # per layer (key_cache, value_cache)


_forward_context: ForwardContext | None = None


@contextmanager
def set_forward_context(
    attn_metadata: "AttentionMetadata | None",
    kv_caches: Sequence[tuple["torch.Tensor", "torch.Tensor"]] | None,
) -> Iterator[ForwardContext]:
    """Make `attn_metadata` and `kv_caches` visible to attention layers for the duration of the block."""
    global _forward_context
    previous = _forward_context
    _forward_context = ForwardContext(attn_metadata, kv_caches if kv_caches is not None else [])
    try:
        yield _forward_context
    finally:
        _forward_context = previous


def get_forward_context() -> ForwardContext:
    """The current forward context; raises if no `set_forward_context` block is active."""
    if _forward_context is None:
        raise RuntimeError("no forward context: run the model inside `with set_forward_context(...)`")
    return _forward_context


def peek_forward_context() -> ForwardContext | None:
    """The current forward context, or None outside any `set_forward_context` block."""
    return _forward_context

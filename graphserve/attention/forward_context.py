"""Per-step state read by attention layers (metadata and KV caches) without passing it through `forward`.

Keeping it out of the model's arguments means torch.compile never sees per-step metadata: the attention op
looks it up at run time, so changing batches cause no guards to fail and no recompiles.
"""
from __future__ import annotations

import threading
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

    attn_metadata: AttentionMetadata | None  # None = profiling/dummy run: plain causal attention, cache untouched
    kv_caches: Sequence[torch.Tensor]  # per layer, in the attention backend's KV cache shape


# Per thread: each engine runs its forwards on its own thread (the server's engine-core thread, the caller's for
# the offline LLM), and two engines in one process must not see each other's metadata.
_local = threading.local()


@contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata | None,
    kv_caches: Sequence[torch.Tensor] | None,
) -> Iterator[ForwardContext]:
    """Make `attn_metadata` and `kv_caches` visible to attention layers for the duration of the block."""
    previous = getattr(_local, "context", None)
    context = _local.context = ForwardContext(attn_metadata, kv_caches if kv_caches is not None else [])
    try:
        yield context
    finally:
        _local.context = previous


def get_forward_context() -> ForwardContext:
    """The current forward context; raises if no `set_forward_context` block is active."""
    context = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("no forward context: run the model inside `with set_forward_context(...)`")
    return context


def peek_forward_context() -> ForwardContext | None:
    """The current forward context, or None outside any `set_forward_context` block."""
    return getattr(_local, "context", None)

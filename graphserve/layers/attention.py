"""The attention layer: one opaque op (`torch.ops.graphserve.unified_attention`) per call.

Like vLLM's `unified_attention_with_output`, the op receives only q/k/v, a preallocated output and an integer
layer id; it finds the layer's backend impl, KV cache and the step's metadata at run time. torch.compile
therefore traces no metadata, and the compile layer can split the graph at this op (piecewise graphs).
"""
import itertools
import weakref

import torch
from torch import nn

from graphserve.attention.backends.base import AttentionBackend
from graphserve.attention.backends.registry import get_attn_backend
from graphserve.attention.forward_context import peek_forward_context
from graphserve.ops._register import register_op

# Layers are found by a process-unique id, not by layer_idx, so two models in one process never collide.
_LAYERS: "weakref.WeakValueDictionary[int, Attention]" = weakref.WeakValueDictionary()
_NEXT_LAYER_ID = itertools.count()


def _unified_attention_ref(
    out: torch.Tensor,  # [num_tokens, num_heads * head_size]
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    layer_id: int,
) -> None:
    """Run layer `layer_id`'s backend impl with the current forward context's metadata and KV cache."""
    layer = _LAYERS[layer_id]
    ctx = peek_forward_context()
    # No context at all (a bare model call) behaves like a profiling run: plain causal attention.
    attn_metadata = ctx.attn_metadata if ctx is not None else None
    kv_cache = None
    if attn_metadata is not None:
        if layer.layer_idx >= len(ctx.kv_caches):
            raise RuntimeError(f"forward context has {len(ctx.kv_caches)} KV caches; layer {layer.layer_idx} needs one")
        kv_cache = ctx.kv_caches[layer.layer_idx]
    num_tokens = query.shape[0]
    layer.impl.forward(
        query.reshape(num_tokens, layer.num_heads, layer.head_size),
        key.reshape(num_tokens, layer.num_kv_heads, layer.head_size),
        value.reshape(num_tokens, layer.num_kv_heads, layer.head_size),
        kv_cache,
        attn_metadata,
        out.view(num_tokens, layer.num_heads, layer.head_size),
    )


register_op("unified_attention", _unified_attention_ref, mutates_args=("out",),
            calls=("reshape_and_cache", "paged_attention"))


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache of layer `layer_idx`."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        layer_idx: int,
        sliding_window: int | None = None,
        *,
        attn_backend: type[AttentionBackend] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        # TORCH_REF runs on every device; the runner may pass a faster backend chosen by the platform.
        self.attn_backend = attn_backend if attn_backend is not None else get_attn_backend("TORCH_REF")
        self.impl = self.attn_backend.get_impl_cls()(num_heads, head_size, scale, num_kv_heads, sliding_window)
        self.layer_id = next(_NEXT_LAYER_ID)
        _LAYERS[self.layer_id] = self

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads * head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_size]
        """Write this step's K/V into the cache and attend; see the forward context for the batch layout."""
        out = torch.empty(
            query.shape[0], self.num_heads * self.head_size, dtype=query.dtype, device=query.device
        )
        torch.ops.graphserve.unified_attention(out, query, key, value, self.layer_id)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
            f"layer_idx={self.layer_idx}, sliding_window={self.sliding_window}, backend={self.attn_backend.name}"
        )

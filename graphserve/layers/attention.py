"""The attention layer: one opaque op (`torch.ops.graphserve.unified_attention`) per call.

The op (ops/attention.py) routes back to this layer by id at run time; the layer reads the step's metadata and
its KV cache from the forward context and runs its backend's impl. The model code never names a backend: the
runner binds the one the platform (or `--attention-backend`) chose with `set_backend`.
"""
from __future__ import annotations

import torch
from torch import nn

from graphserve.attention.backends.base import AttentionBackend
from graphserve.attention.backends.registry import get_attn_backend
from graphserve.attention.forward_context import peek_forward_context
from graphserve.ops import attention as attention_ops

_DEFAULT_BACKEND = "PAGED_ATTN"


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
        logits_soft_cap: float | None = None,
        alibi_slopes: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap  # cap * tanh(score / cap) before the softmax (Gemma 2)
        # ALiBi: slope_h * (key position - query position) added to head h's scores (Bloom, Falcon-RW, MPT).
        self.alibi_slope_values = list(alibi_slopes) if alibi_slopes is not None else None
        self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes, dtype=torch.float32)
                             if alibi_slopes is not None else None, persistent=False)
        self.set_backend(get_attn_backend(_DEFAULT_BACKEND))
        self.layer_id = attention_ops.register_attention_layer(self)
        # FP8 KV cache scales (k_scale, v_scale: fp32, per layer), from the checkpoint or 1.0 (`set_kv_scale`).
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.kv_scales_loaded: set[str] = set()

    def init_buffers(self) -> None:
        """Scales of 1.0 until the checkpoint provides others (the model is built on the meta device, so its
        buffers are materialized uninitialized)."""
        self.k_scale.fill_(1.0)
        self.v_scale.fill_(1.0)
        if self.alibi_slopes is not None:
            self.alibi_slopes.copy_(torch.tensor(self.alibi_slope_values, dtype=torch.float32))
        self.kv_scales_loaded.clear()

    def set_kv_scale(self, which: str, value: float) -> None:
        """Set "k" or "v" (or "kv": both) from a checkpoint's scalar; ValueError unless finite and positive."""
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"KV cache scale {which}_scale must be a finite positive number, got {value}")
        for name in ("k", "v") if which == "kv" else (which,):
            getattr(self, f"{name}_scale").fill_(value)
            self.kv_scales_loaded.add(name)

    def set_backend(self, attn_backend: type[AttentionBackend]) -> None:
        """Run this layer through `attn_backend` (its KV cache must be in that backend's shape)."""
        self.attn_backend = attn_backend
        self.impl = attn_backend.get_impl_cls()(self.num_heads, self.head_size, self.scale, self.num_kv_heads,
                                                self.sliding_window, self.logits_soft_cap,
                                                self.alibi_slope_values is not None)

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
        attention_ops.unified_attention(out, query, key, value, self.layer_id)
        return out

    def forward_attention(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads * head_size]
        query: torch.Tensor,  # [num_tokens, num_heads * head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    ) -> None:
        """What `unified_attention` runs: the backend impl with the forward context's metadata and KV cache."""
        ctx = peek_forward_context()
        # No context at all (a bare model call) behaves like a profiling run: plain causal attention.
        attn_metadata = ctx.attn_metadata if ctx is not None else None
        kv_cache = None
        if attn_metadata is not None:
            if self.layer_idx >= len(ctx.kv_caches):
                raise RuntimeError(f"forward context has {len(ctx.kv_caches)} KV caches; layer {self.layer_idx} "
                                   "needs one")
            kv_cache = ctx.kv_caches[self.layer_idx]
        num_tokens = query.shape[0]
        fp8 = kv_cache is not None and kv_cache.dtype.itemsize == 1
        self.impl.forward(
            query.view(num_tokens, self.num_heads, self.head_size),
            key.view(num_tokens, self.num_kv_heads, self.head_size),
            value.view(num_tokens, self.num_kv_heads, self.head_size),
            kv_cache,
            attn_metadata,
            out.view(num_tokens, self.num_heads, self.head_size),
            k_scale=self.k_scale if fp8 else None,
            v_scale=self.v_scale if fp8 else None,
            alibi_slopes=self.alibi_slopes,
        )

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
            f"layer_idx={self.layer_idx}, sliding_window={self.sliding_window}, backend={self.attn_backend.name}"
        )


def bind_attention_backend(model: nn.Module, attn_backend: type[AttentionBackend]) -> int:
    """Run every attention layer of `model` through `attn_backend`; returns how many layers were bound."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_backend(attn_backend)
    return len(layers)

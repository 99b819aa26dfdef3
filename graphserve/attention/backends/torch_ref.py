"""The torch reference backend: the CPU backend and the test oracle for every other backend.

It calls the `torch.ops.graphserve` cache/attention ops, so a platform that registers device kernels for
those ops (e.g. Triton on "CUDA") runs through this same backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphserve.attention.backends.base import AttentionBackend, AttentionImpl, AttentionMetadata
from graphserve.ops import attention as attention_ops


def causal_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    """Plain causal self-attention of one sequence without a KV cache (profiling and dummy runs)."""
    group = query.shape[1] // key.shape[1]
    q = query.transpose(0, 1)  # [num_heads, num_tokens, head_size]
    k = key.repeat_interleave(group, dim=1).transpose(0, 1)
    v = value.repeat_interleave(group, dim=1).transpose(0, 1)
    if not sliding_window:
        # SDPA's memory-efficient kernels matter here: a profiling run can be max_num_batched_tokens long.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        pos = torch.arange(query.shape[0], device=query.device)
        diff = pos.unsqueeze(1) - pos.unsqueeze(0)  # query position minus key position
        mask = (diff >= 0) & (diff < sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class TorchRefImpl(AttentionImpl):
    """Writes the new K/V with `reshape_and_cache`, then runs `paged_attention` over the whole batch."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # each [num_blocks, block_size, num_kv_heads, head_size]
        attn_metadata: AttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    ) -> None:
        """Attention for one layer; without metadata or cache, plain causal attention over all tokens."""
        if attn_metadata is None or kv_cache is None:
            output.copy_(causal_attention(query, key, value, self.scale, self.sliding_window))
            return
        key_cache, value_cache = kv_cache
        md = attn_metadata
        attention_ops.reshape_and_cache(key, value, key_cache, value_cache, md.slot_mapping)
        attention_ops.paged_attention(
            output, query, key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
            self.scale, self.sliding_window or 0, md.max_query_len, md.max_seq_len,
        )


class TorchRefBackend(AttentionBackend):
    """Pure-torch paged attention: any head size, fp32/fp16/bf16, any device."""

    name = "TORCH_REF"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The reference impl."""
        return TorchRefImpl

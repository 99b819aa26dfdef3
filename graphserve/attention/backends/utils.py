"""Helpers shared by the attention backends."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    """Plain causal self-attention of one sequence without a KV cache (profiling and dummy runs)."""
    if logits_soft_cap or alibi_slopes is not None:  # not SDPA's: the op's reference, in fp32
        from graphserve.ops.attention import attend_one_sequence

        return attend_one_sequence(query, key, value, scale, sliding_window or 0, logits_soft_cap,
                                   alibi_slopes).to(query.dtype)
    group = query.shape[1] // key.shape[1]
    q = query.transpose(0, 1)  # [num_heads, num_tokens, head_size]
    k = key.repeat_interleave(group, dim=1).transpose(0, 1)
    v = value.repeat_interleave(group, dim=1).transpose(0, 1)
    if not sliding_window:
        # SDPA's memory-efficient kernels matter here: a profiling run can be max_num_batched_tokens long.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(query.shape[0], query.shape[0],
                                                                            sliding_window, query.device),
                                             scale=scale)
    return out.transpose(0, 1)


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] bool, True where query i (at position seq_len - query_len + i) sees key j."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    visible = k_pos <= q_pos
    if sliding_window:
        visible &= k_pos > q_pos - sliding_window
    return visible

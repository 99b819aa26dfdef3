"""Attention ops: `unified_attention` (what a model's attention layer calls), and the paged KV cache ops
`reshape_and_cache` (write new K/V) and `paged_attention` (mixed prefill/decode batches).

`unified_attention`, like vLLM's `unified_attention_with_output`, receives only q/k/v, a preallocated output
and an integer layer id: it finds the layer at run time (`register_attention_layer`) and the layer runs its
backend with the step's metadata and KV cache. torch.compile therefore traces no metadata, and the compile layer
can split the graph at this op (piecewise graphs).

Paged KV cache layout of the paged ops (flash/NHD): key_cache and value_cache are each
[num_blocks, block_size, num_kv_heads, head_dim]. Token slot `s` lives at block `s // block_size`, offset
`s % block_size`; slot < 0 means "do not write".

FP8 KV cache (`--kv-cache-dtype fp8`): the caches are float8_e4m3fn (or e5m2) and both ops take the layer's
`k_scale` / `v_scale` (one fp32 number each, on the device): the write stores fp8(clamp(k / k_scale, ±max)), the
attention reads float(cache) * k_scale (formats.md §4.2). Without scales (None) the caches are in the model dtype
or scaled by 1.0.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch

from graphserve.ops._register import register_op


class AttentionLayer(Protocol):
    """What `unified_attention` calls: a model's attention layer (graphserve.layers.attention.Attention)."""

    def forward_attention(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads * head_size]
        query: torch.Tensor,  # [num_tokens, num_heads * head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    ) -> None:
        """Attend this step's tokens and write the result into `out`."""


# Layers are found by a process-unique id, not by layer index, so two models in one process never collide.
_LAYERS: weakref.WeakValueDictionary[int, AttentionLayer] = weakref.WeakValueDictionary()
_NEXT_LAYER_ID = itertools.count()


def register_attention_layer(layer: AttentionLayer) -> int:
    """Make `layer` reachable from `unified_attention`; returns its id (held weakly: the model owns the layer)."""
    layer_id = next(_NEXT_LAYER_ID)
    _LAYERS[layer_id] = layer
    return layer_id


def _unified_attention_ref(
    out: torch.Tensor,  # [num_tokens, num_heads * head_size]
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    layer_id: int,
) -> None:
    """Route to layer `layer_id`, which runs its attention backend."""
    _LAYERS[layer_id].forward_attention(out, query, key, value)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What the cache stores for x: x / scale saturated into an fp8 cache's range, or x cast to the cache dtype."""
    if not cache_dtype.is_floating_point or cache_dtype.itemsize != 1:
        return x.to(cache_dtype)
    limit = torch.finfo(cache_dtype).max
    x = x.float() if scale is None else x.float() / scale.float()
    return x.clamp(-limit, limit).to(cache_dtype)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 values a cache slice stands for."""
    return x.float() if scale is None else x.float() * scale.float()


def _reshape_and_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    k_scale: torch.Tensor | None = None,  # [1] fp32 (FP8 caches)
    v_scale: torch.Tensor | None = None,  # [1] fp32
) -> None:
    """Scatter each token's K/V into its cache slot (quantized for an FP8 cache); negative slots are skipped."""
    if key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    # Indexing by (block, offset) instead of flattening the cache keeps this correct for strided caches.
    index = (slots // block_size, slots % block_size)
    key_cache.index_put_(index, to_cache(key[valid], key_cache.dtype, k_scale))
    value_cache.index_put_(index, to_cache(value[valid], value_cache.dtype, v_scale))


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(scores / cap) (Gemma 2's attention-logit soft-capping); the scores themselves when cap is 0."""
    return torch.tanh(scores / cap) * cap if cap > 0 else scores


def attend_one_sequence(
    query: torch.Tensor,  # [query_len, num_heads, head_dim]
    key: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
    sliding_window: int,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] fp32
) -> torch.Tensor:  # [query_len, num_heads, head_dim] float32
    """Causal (bottom-right aligned) GQA attention of one sequence's queries over its whole context, in fp32;
    ALiBi adds slope_h * (key position - query position) to the scores."""
    query_len, num_heads, head_dim = query.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    # Query head h reads kv head h // group, so heads are grouped as [num_kv_heads, group].
    q = query.float().reshape(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(num_kv_heads, group * query_len, head_dim)
    k = key.float().permute(1, 2, 0)  # [num_kv_heads, head_dim, seq_len]
    v = value.float().permute(1, 0, 2)  # [num_kv_heads, seq_len, head_dim]
    scores = soft_cap(torch.bmm(q, k).mul_(scale), logits_soft_cap).view(num_kv_heads, group, query_len, seq_len)
    # Query i of the chunk sits at absolute position seq_len - query_len + i.
    q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)
    visible = k_pos <= q_pos
    if sliding_window > 0:
        visible &= k_pos > q_pos - sliding_window
    if alibi_slopes is not None:
        scores += alibi_slopes.float().view(num_kv_heads, group, 1, 1) * (k_pos - q_pos).float()
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_kv_heads, group * query_len, seq_len)
    out = torch.bmm(probs, v).view(num_kv_heads, group, query_len, head_dim)
    return out.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim)


def _decode_attention(
    query: torch.Tensor,  # [num_decodes, num_heads, head_dim]: one query token per sequence
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_decodes, >= max blocks] int
    seq_lens: torch.Tensor,  # [num_decodes] int64
    scale: float,
    sliding_window: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim] float32
    """Single-token queries of many sequences at once: one gather of their padded contexts, one masked softmax.

    Positions past a sequence's length (and before its window) are masked to -inf, so they weigh exactly zero.
    """
    num_decodes, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    blocks = block_table[:, :num_blocks].long()
    # Table entries past a sequence's own blocks are padding (any value): read block 0 there instead, masked below.
    owned = torch.arange(num_blocks, device=query.device).unsqueeze(0) < (-(-seq_lens // block_size)).unsqueeze(1)
    blocks = torch.where(owned, blocks, torch.zeros_like(blocks))
    k = from_cache(key_cache[blocks].flatten(1, 2)[:, :max_len], k_scale)  # [num_decodes, max_len, kv_heads, d]
    v = from_cache(value_cache[blocks].flatten(1, 2)[:, :max_len], v_scale)
    q = query.float().view(num_decodes, num_kv_heads, group, head_dim)
    scores = soft_cap(torch.einsum("bkgd,bskd->bkgs", q, k).mul_(scale), logits_soft_cap)
    pos = torch.arange(max_len, device=query.device)
    visible = pos.unsqueeze(0) < seq_lens.unsqueeze(1)  # [num_decodes, max_len]
    if sliding_window > 0:
        visible &= pos.unsqueeze(0) > (seq_lens - 1 - sliding_window).unsqueeze(1)
    if alibi_slopes is not None:
        relative = (pos.unsqueeze(0) - (seq_lens - 1).unsqueeze(1)).float()  # [num_decodes, max_len]
        scores += alibi_slopes.float().view(1, num_kv_heads, group, 1) * relative[:, None, None, :]
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(num_decodes, num_heads, head_dim)


def _paged_attention_ref(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int,
    max_query_len: int,
    max_seq_len: int,
    k_scale: torch.Tensor | None = None,  # [1] fp32 (FP8 caches)
    v_scale: torch.Tensor | None = None,  # [1] fp32
    logits_soft_cap: float = 0.0,  # > 0: scores soft-capped to (-cap, cap) before the softmax (Gemma 2)
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] fp32: ALiBi biases (Bloom, Falcon-RW, MPT)
) -> None:
    """Attention of every sequence's new tokens over its cached context (read back through the FP8 scales).

    Sequences with one new token (decodes) are attended together in one batched pass; each longer chunk
    (prefill) gets one gather and one matmul of its own. `max_query_len` and `max_seq_len` size the grids of
    device kernels; the reference does not need them. Rows past `query_start_loc[-1]` (graph padding) are zeroed.
    """
    block_size = key_cache.shape[1]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes = [b for b, n in enumerate(lens) if n > 0 and starts[b + 1] - starts[b] == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=query.device)
        index = torch.tensor(decodes, device=query.device)
        attn = _decode_attention(query[rows], key_cache, value_cache, block_table[index],
                                 seq_lens[index].long(), scale, sliding_window, k_scale, v_scale, logits_soft_cap,
                                 alibi_slopes)
        out[rows] = attn.to(out.dtype)
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end - q_start <= 1 or seq_len == 0:
            continue  # nothing to attend, or a decode (done above)
        num_blocks = -(-seq_len // block_size)
        blocks = block_table[b, :num_blocks].long()
        k = from_cache(key_cache[blocks].flatten(0, 1)[:seq_len], k_scale)  # [seq_len, num_kv_heads, head_dim]
        v = from_cache(value_cache[blocks].flatten(0, 1)[:seq_len], v_scale)
        attn = attend_one_sequence(query[q_start:q_end], k, v, scale, sliding_window, logits_soft_cap, alibi_slopes)
        out[q_start:q_end] = attn.to(out.dtype)
    out[starts[-1] :].zero_()


# Both references sync with the host (boolean-mask indexing, `.tolist()`), so only device kernels can be captured.
_RESHAPE_AND_CACHE = register_op(
    "reshape_and_cache", _reshape_and_cache_ref, mutates_args=("key_cache", "value_cache"),
    reference_graph_safe=False,
)
_PAGED_ATTENTION = register_op(
    "paged_attention", _paged_attention_ref, mutates_args=("out",), reference_graph_safe=False
)
# A router: it can be captured exactly when the backend's own ops can (AttentionBackend.graph_blockers).
register_op("unified_attention", _unified_attention_ref, mutates_args=("out",))


def unified_attention(
    out: torch.Tensor,  # [num_tokens, num_heads * head_size]
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    layer_id: int,
) -> None:
    """Attention of layer `layer_id` over the paged cache, written into `out`."""
    torch.ops.graphserve.unified_attention(out, query, key, value, layer_id)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    k_scale: torch.Tensor | None = None,  # [1] fp32: FP8 caches
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new K/V into the paged cache (slot < 0 skipped)."""
    torch.ops.graphserve.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def paged_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int,
    max_query_len: int,
    max_seq_len: int,
    k_scale: torch.Tensor | None = None,  # [1] fp32: FP8 caches
    v_scale: torch.Tensor | None = None,
    logits_soft_cap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] fp32
) -> None:
    """Causal GQA attention over the paged cache for a mixed batch, written into `out` (sliding_window 0 = none,
    logits_soft_cap 0 = none, alibi_slopes None = none)."""
    torch.ops.graphserve.paged_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        scale, sliding_window, max_query_len, max_seq_len, k_scale, v_scale, logits_soft_cap, alibi_slopes,
    )

"""TORCH_SDPA: attention through `torch.nn.functional.scaled_dot_product_attention`, on any device.

KV layout (HND): one tensor per layer, [2, num_blocks, num_kv_heads, block_size, head_size], so a sequence's
gathered blocks are already in the [heads, tokens, head_size] order SDPA reads. Prefill chunks attend one
sequence at a time through SDPA (its fused CPU / GPU kernels, GQA without repeating K/V); decode rows are
gathered to the batch's longest context and attended in one masked SDPA call. The batch layout is kept on the
host too, so the impl loops without reading the device. Plain torch with host-side loops: no CUDA/HIP graphs.

It is the second backend that proves the seam: selectable with `--attention-backend TORCH_SDPA`, same outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from graphserve.attention.backends.base import (
    AttentionBackend,
    AttentionImpl,
    AttentionInputs,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from graphserve.attention.backends.paged import PagedAttentionMetadataBuilder
from graphserve.attention.backends.utils import causal_attention, causal_mask


@dataclass
class SDPAMetadata(AttentionMetadata):
    """The common layout plus host copies the per-sequence loop reads."""

    query_start_loc_host: list[int] | None = None  # [num_seqs + 1]
    seq_lens_host: list[int] | None = None  # [num_seqs]
    decode_rows: list[int] | None = None  # sequences with one query token, attended together


class SDPAMetadataBuilder(PagedAttentionMetadataBuilder):
    """The paged builder's device tensors (slots, block table) plus the host-side lists."""

    def build(self, inputs: AttentionInputs) -> SDPAMetadata:
        """Upload the batch and keep its layout on the host."""
        md = super().build(inputs)
        query_lens = np.diff(inputs.query_start_loc)
        return SDPAMetadata(
            **vars(md),
            query_start_loc_host=inputs.query_start_loc.tolist(),
            seq_lens_host=inputs.seq_lens.tolist(),
            decode_rows=np.flatnonzero(query_lens == 1).tolist(),
        )

    def build_for_capture(self, num_reqs: int, query_len: int = 1) -> AttentionMetadata:
        """Not capturable: the impl loops on the host (TorchSDPABackend.supports_cuda_graphs is False)."""
        raise NotImplementedError("the TORCH_SDPA attention backend cannot be captured in CUDA/HIP graphs")

    def prepare_for_replay(self, inputs: AttentionInputs, num_padded_reqs: int, query_len: int = 1) -> None:
        """Not capturable: the impl loops on the host."""
        raise NotImplementedError("the TORCH_SDPA attention backend cannot be captured in CUDA/HIP graphs")


class SDPAImpl(AttentionImpl):
    """Cache write by index, then SDPA per prefill chunk and one batched SDPA over the decode rows."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, num_kv_heads, block_size, head_size]
        attn_metadata: SDPAMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
        k_scale: torch.Tensor | None = None,  # FP8 caches are not supported here (validated at start-up)
        v_scale: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        """Attention for one layer; without metadata or cache, plain causal attention over all tokens."""
        if attn_metadata is None or kv_cache is None:
            output.copy_(causal_attention(query, key, value, self.scale, self.sliding_window))
            return
        md = attn_metadata
        key_cache, value_cache = kv_cache.unbind(0)
        block_size = key_cache.shape[2]
        # No graphs, so no padded rows: every slot is a real one.
        slots = md.slot_mapping
        blocks, offsets = slots // block_size, slots % block_size
        key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
        value_cache[blocks, :, offsets] = value.to(value_cache.dtype)
        starts, seq_lens = md.query_start_loc_host, md.seq_lens_host
        if md.decode_rows:
            self._decode(query, key_cache, value_cache, md, output)
        decodes = set(md.decode_rows)
        for i, seq_len in enumerate(seq_lens):
            if i in decodes:
                continue
            q_start, q_end = starts[i], starts[i + 1]
            k, v = self._context(key_cache, value_cache, md.block_table[i], seq_len)
            q = query[q_start:q_end].transpose(0, 1)  # [num_heads, query_len, head_size]
            query_len = q_end - q_start
            if query_len == seq_len and not self.sliding_window:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                mask = causal_mask(query_len, seq_len, self.sliding_window, query.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
            output[q_start:q_end] = out.transpose(0, 1)

    @staticmethod
    def _context(
        key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
        value_cache: torch.Tensor,
        block_table_row: torch.Tensor,  # [max_blocks] int32
        seq_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # each [num_kv_heads, seq_len, head_size]
        """A sequence's keys and values, gathered from its blocks."""
        blocks = block_table_row[: -(-seq_len // key_cache.shape[2])].long()
        k = key_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :seq_len]
        v = value_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :seq_len]
        return k, v

    def _decode(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
        value_cache: torch.Tensor,
        md: SDPAMetadata,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    ) -> None:
        """Every one-token query at once: contexts gathered to the longest one, the rest masked out."""
        rows = md.decode_rows
        device = query.device
        lens = torch.tensor([md.seq_lens_host[i] for i in rows], device=device)
        token_rows = torch.tensor([md.query_start_loc_host[i] for i in rows], device=device)
        max_len = max(md.seq_lens_host[i] for i in rows)
        block_size = key_cache.shape[2]
        num_blocks = -(-max_len // block_size)
        blocks = md.block_table[torch.tensor(rows, device=device), :num_blocks].long()
        owned = torch.arange(num_blocks, device=device).unsqueeze(0) < (-(-lens // block_size)).unsqueeze(1)
        blocks = torch.where(owned, blocks, torch.zeros_like(blocks))  # table padding may hold any value
        k = key_cache[blocks].transpose(1, 2).flatten(2, 3)[:, :, :max_len]  # [rows, num_kv_heads, max_len, hd]
        v = value_cache[blocks].transpose(1, 2).flatten(2, 3)[:, :, :max_len]
        pos = torch.arange(max_len, device=device).unsqueeze(0)
        visible = pos < lens.unsqueeze(1)
        if self.sliding_window:
            visible &= pos > (lens - 1 - self.sliding_window).unsqueeze(1)
        q = query[token_rows].unsqueeze(2)  # [rows, num_heads, 1, head_size]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=self.scale,
                                             enable_gqa=True)
        output[token_rows] = out.squeeze(2)


class TorchSDPABackend(AttentionBackend):
    """SDPA over an HND paged cache: any device, any head size SDPA takes; no graphs."""

    name = "TORCH_SDPA"
    supports_cuda_graphs = False

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The SDPA impl."""
        return SDPAImpl

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        """The paged builder plus host lists."""
        return SDPAMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Keys and values of one layer, each [num_blocks, num_kv_heads, block_size, head_size]."""
        return (2, num_blocks, num_kv_heads, block_size, head_size)

"""PAGED_ATTN: graphserve's own paged attention ops, the default backend on every platform.

KV layout (flash / NHD): one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_size], keys then
values, in the model dtype or FP8 (`--kv-cache-dtype fp8`: written and read through the layer's k/v scales).
The impl writes new K/V with `torch.ops.graphserve.reshape_and_cache` and attends with
`torch.ops.graphserve.paged_attention` (mixed prefill / decode batches in one call). The platform decides what
runs behind those ops: the torch reference on the CPU (the test oracle of every other kernel and backend),
Triton kernels on CUDA/ROCm, which are graph-safe, so decode steps replay from CUDA/HIP graphs.
"""
from __future__ import annotations

import numpy as np
import torch

from graphserve.attention.backends.base import (
    PAD_SLOT_ID,
    AttentionBackend,
    AttentionImpl,
    AttentionInputs,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from graphserve.attention.backends.utils import causal_attention
from graphserve.buffers import StagedBuffer
from graphserve.ops import attention as attention_ops


class PagedAttentionMetadataBuilder(AttentionMetadataBuilder):
    """Stages the batch layout into persistent buffers; graphs are captured over slices of them.

    A graph of `size` requests with `query_len` query tokens each reads token rows [0, size * query_len) and
    request rows [0, size) of each buffer, with the block table at its full width (max_model_len / block_size):
    a decode graph has one query token per request, a verify graph 1 + num_speculative_tokens. Padded requests
    write nowhere (slot -1) and read `query_len` tokens of block 0, which always exists, so a kernel launched over
    the whole bucket stays inside the pool.
    """

    def __init__(self, block_size: int, max_num_reqs: int, max_num_tokens: int, max_model_len: int,
                 device: torch.device, pin_memory: bool) -> None:
        super().__init__(block_size, max_num_reqs, max_num_tokens, max_model_len, device, pin_memory)

        def buffer(size: int, dtype: torch.dtype, fill: int = 0) -> StagedBuffer:
            return StagedBuffer((size,), dtype, device, pin_memory, fill)

        self.slot_mapping = buffer(max_num_tokens, torch.int64, PAD_SLOT_ID)
        self.query_start_loc = buffer(max_num_reqs + 1, torch.int32)
        self.seq_lens = buffer(max_num_reqs, torch.int32, 1)
        # Flat, so that a step uses a contiguous [num_reqs, width] prefix of whatever width it needs.
        self.block_table = buffer(max_num_reqs * self.max_blocks_per_seq, torch.int32)
        # Graphs: every request holds exactly query_len query tokens (padded requests included), so the offsets
        # are constant per query length: 0, q, 2q, ...
        self._uniform_query_start_loc: dict[int, torch.Tensor] = {}

    def uniform_query_start_loc(self, query_len: int) -> torch.Tensor:
        """[max_num_reqs + 1] int32 offsets of requests of `query_len` tokens each (a static device tensor)."""
        loc = self._uniform_query_start_loc.get(query_len)
        if loc is None:
            with torch.inference_mode():
                loc = torch.arange(self.max_num_reqs + 1, dtype=torch.int32, device=self.device) * query_len
            self._uniform_query_start_loc[query_len] = loc
        return loc

    def build(self, inputs: AttentionInputs) -> AttentionMetadata:
        """Upload the batch as it is (no padding): metadata for the eager or compiled forward."""
        num_reqs, num_tokens = inputs.num_reqs, inputs.num_tokens
        width = inputs.block_table.shape[1]
        self.slot_mapping.np[:num_tokens] = inputs.slot_mapping
        self.query_start_loc.np[: num_reqs + 1] = inputs.query_start_loc
        self.seq_lens.np[:num_reqs] = inputs.seq_lens
        self.block_table.np[: num_reqs * width].reshape(num_reqs, width)[:] = inputs.block_table
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.upload(num_tokens),
            query_start_loc=self.query_start_loc.upload(num_reqs + 1),
            seq_lens=self.seq_lens.upload(num_reqs),
            block_table=self.block_table.upload(num_reqs * width).view(num_reqs, width),
            max_query_len=int(np.diff(inputs.query_start_loc).max()) if num_reqs else 0,
            max_seq_len=int(inputs.seq_lens.max()) if num_reqs else 0,
            num_actual_tokens=num_tokens,
        )

    def build_for_capture(self, num_reqs: int, query_len: int = 1) -> AttentionMetadata:
        """Views of requests [0, num_reqs), all padding for now; max_seq_len = max_model_len keeps the grids
        static."""
        self._stage_padding(0, num_reqs, query_len)
        self._upload(num_reqs, query_len)
        width = self.max_blocks_per_seq
        num_tokens = num_reqs * query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.device[:num_tokens],
            query_start_loc=self.uniform_query_start_loc(query_len)[: num_reqs + 1],
            seq_lens=self.seq_lens.device[:num_reqs],
            block_table=self.block_table.device[: num_reqs * width].view(num_reqs, width),
            max_query_len=query_len,
            max_seq_len=self.max_model_len,
            num_actual_tokens=num_tokens,
        )

    def prepare_for_replay(self, inputs: AttentionInputs, num_padded_reqs: int, query_len: int = 1) -> None:
        """Write a batch of `query_len` tokens per request into requests [0, num_reqs), pad the rest of the
        bucket."""
        num_reqs, width = inputs.num_reqs, inputs.block_table.shape[1]
        if inputs.num_tokens != num_reqs * query_len:
            raise ValueError(f"a graph of {query_len} tokens per request replays {inputs.num_tokens} tokens of "
                             f"{num_reqs} requests")
        self.slot_mapping.np[: inputs.num_tokens] = inputs.slot_mapping
        self.seq_lens.np[:num_reqs] = inputs.seq_lens
        full = self.max_blocks_per_seq
        table = self.block_table.np[: num_padded_reqs * full].reshape(num_padded_reqs, full)
        table[:num_reqs, :width] = inputs.block_table
        # Staging copies alternate between steps, so columns past this step's width hold older block ids.
        table[:num_reqs, width:] = 0
        self._stage_padding(num_reqs, num_padded_reqs, query_len)
        self._upload(num_padded_reqs, query_len)

    def _stage_padding(self, start: int, end: int, query_len: int) -> None:
        """Requests [start, end) become padding: no cache write, `query_len` tokens of context in block 0 (as
        long as its query, so every padded query token sees at least one key)."""
        full = self.max_blocks_per_seq
        self.slot_mapping.np[start * query_len : end * query_len] = PAD_SLOT_ID
        self.seq_lens.np[start:end] = query_len
        self.block_table.np[start * full : end * full] = 0

    def _upload(self, num_reqs: int, query_len: int) -> None:
        self.slot_mapping.upload(num_reqs * query_len)
        self.seq_lens.upload(num_reqs)
        self.block_table.upload(num_reqs * self.max_blocks_per_seq)


class PagedAttentionImpl(AttentionImpl):
    """Writes the new K/V with `reshape_and_cache`, then runs `paged_attention` over the whole batch."""

    supports_logits_soft_cap = True
    supports_alibi = True

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        attn_metadata: AttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
        k_scale: torch.Tensor | None = None,  # [1] fp32: an FP8 cache's scales
        v_scale: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,  # [num_heads] fp32
    ) -> None:
        """Attention for one layer; without metadata or cache, plain causal attention over all tokens."""
        if attn_metadata is None or kv_cache is None:
            output.copy_(causal_attention(query, key, value, self.scale, self.sliding_window, self.logits_soft_cap,
                                          alibi_slopes))
            return
        key_cache, value_cache = kv_cache.unbind(0)
        md = attn_metadata
        attention_ops.reshape_and_cache(key, value, key_cache, value_cache, md.slot_mapping, k_scale, v_scale)
        attention_ops.paged_attention(
            output, query, key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
            self.scale, self.sliding_window or 0, md.max_query_len, md.max_seq_len, k_scale, v_scale,
            self.logits_soft_cap, alibi_slopes,
        )


class PagedAttentionBackend(AttentionBackend):
    """Paged attention through graphserve's ops: any head size, fp32/fp16/bf16, graphs where the ops allow."""

    name = "PAGED_ATTN"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True
    ops = ("reshape_and_cache", "paged_attention")

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The paged impl."""
        return PagedAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        """The persistent-buffer builder."""
        return PagedAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Keys and values of one layer, each [num_blocks, block_size, num_kv_heads, head_size]."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

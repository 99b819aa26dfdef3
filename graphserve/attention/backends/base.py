"""Attention backend interface: static capabilities, a metadata builder and an impl (vLLM V1 split)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np
import torch

# What a model runner naturally holds: Python lists, numpy slices of its persistent buffers, or tensors.
IntArray = Union[Sequence[int], np.ndarray, torch.Tensor]
PAD_SLOT_ID = -1


@dataclass
class AttentionMetadata:
    """Per-step batch layout shared by every attention layer (built once per step, read through the forward context)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write (padding)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cu_seqlens_q
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int  # tokens before graph padding; equals query_start_loc[-1]

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return self.seq_lens.shape[0]


def _as_int_tensor(x: IntArray, dtype: torch.dtype) -> torch.Tensor:
    """A fresh CPU tensor (never a view of the runner's reusable numpy buffers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype, copy=True)
    return torch.tensor(np.asarray(x), dtype=dtype)


def _pad_block_tables(block_tables: IntArray | Sequence[Sequence[int]], width: int | None) -> torch.Tensor:
    """[num_seqs, max_blocks] int32 from a ragged list of block id lists or from a 2-D array."""
    if isinstance(block_tables, (torch.Tensor, np.ndarray)):
        table = _as_int_tensor(block_tables, torch.int32)
        if table.dim() != 2:
            raise ValueError(f"block_tables must be 2-D, got shape {tuple(table.shape)}")
    else:
        rows = [list(r) for r in block_tables]
        table = torch.zeros(len(rows), max((len(r) for r in rows), default=0), dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    if width is not None:
        if table.shape[1] > width:
            raise ValueError(f"a block table has {table.shape[1]} blocks, more than max_num_blocks_per_seq={width}")
        table = torch.nn.functional.pad(table, (0, width - table.shape[1]))
    return table


class AttentionMetadataBuilder:
    """Builds `AttentionMetadata` from the runner's host-side batch description."""

    def __init__(self, block_size: int, max_num_blocks_per_seq: int | None = None) -> None:
        self.block_size = block_size
        # A fixed block-table width gives graph-capturable, static shapes.
        self.max_num_blocks_per_seq = max_num_blocks_per_seq

    def build(
        self,
        query_lens: IntArray,  # [num_seqs] tokens scheduled this step per sequence
        seq_lens: IntArray,  # [num_seqs] context length after this step
        block_tables: IntArray | Sequence[Sequence[int]],  # ragged lists or [num_seqs, max_blocks]
        slot_mapping: IntArray | None = None,  # [num_tokens] int64; None = derive from block tables
        device: torch.device | str = "cpu",
        num_tokens: int | None = None,  # pad the token dimension to this size with slot -1 (graph buckets)
    ) -> AttentionMetadata:
        """Validate the batch and move it to `device` as the tensors the attention ops read."""
        q_lens = _as_int_tensor(query_lens, torch.int64)
        s_lens = _as_int_tensor(seq_lens, torch.int64)
        table = _pad_block_tables(block_tables, self.max_num_blocks_per_seq)
        num_seqs = q_lens.shape[0]
        if s_lens.shape[0] != num_seqs or table.shape[0] != num_seqs:
            raise ValueError(
                f"query_lens, seq_lens and block_tables disagree on the number of sequences: "
                f"{num_seqs}, {s_lens.shape[0]}, {table.shape[0]}"
            )
        if bool((q_lens < 0).any()) or bool((s_lens < q_lens).any()):
            raise ValueError("every sequence needs 0 <= query_len <= seq_len")
        if bool((s_lens > table.shape[1] * self.block_size).any()):
            raise ValueError(f"a seq_len exceeds its block table ({table.shape[1]} blocks of {self.block_size})")
        num_actual = int(q_lens.sum())
        if slot_mapping is None:
            slots = self._compute_slot_mapping(q_lens, s_lens, table)
        else:
            slots = _as_int_tensor(slot_mapping, torch.int64)
            if slots.shape[0] != num_actual:
                raise ValueError(f"slot_mapping has {slots.shape[0]} entries for {num_actual} scheduled tokens")
        if num_tokens is not None:
            if num_tokens < num_actual:
                raise ValueError(f"num_tokens={num_tokens} is smaller than the {num_actual} scheduled tokens")
            slots = torch.nn.functional.pad(slots, (0, num_tokens - num_actual), value=PAD_SLOT_ID)
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(q_lens, 0)
        # Non-blocking: a blocking copy would wait for every kernel queued before it (with async scheduling,
        # the whole previous step). The sources are fresh host tensors, staged by the copy before it returns.
        return AttentionMetadata(
            slot_mapping=slots.to(device, non_blocking=True),
            query_start_loc=query_start_loc.to(device, non_blocking=True),
            seq_lens=s_lens.to(torch.int32).to(device, non_blocking=True),
            block_table=table.to(device, non_blocking=True),
            max_query_len=int(q_lens.max()) if num_seqs else 0,
            max_seq_len=int(s_lens.max()) if num_seqs else 0,
            num_actual_tokens=num_actual,
        )

    def _compute_slot_mapping(
        self,
        query_lens: torch.Tensor,  # [num_seqs] int64
        seq_lens: torch.Tensor,  # [num_seqs] int64
        block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    ) -> torch.Tensor:  # [num_tokens] int64
        """slot = block_table[seq][pos // block_size] * block_size + pos % block_size for each new token."""
        seq_idx = torch.repeat_interleave(torch.arange(query_lens.shape[0]), query_lens)
        first_token = torch.cumsum(query_lens, 0) - query_lens
        first_pos = seq_lens - query_lens
        positions = torch.arange(seq_idx.shape[0]) - first_token[seq_idx] + first_pos[seq_idx]
        blocks = block_table[seq_idx, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size


class AttentionImpl(ABC):
    """Runs one layer's attention for a batch described by `AttentionMetadata`."""

    def __init__(
        self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, sliding_window: int | None = None
    ) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # each [num_blocks, block_size, num_kv_heads, head_size]
        attn_metadata: AttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    ) -> None:
        """Write attention output into `output`; without metadata, plain causal attention over the tokens."""


class AttentionBackend(ABC):
    """Static description of an attention implementation; selected per platform by the registry."""

    name: ClassVar[str]
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None  # None = any
    supports_cuda_graphs: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The class that runs attention for one layer."""

    @staticmethod
    def get_metadata_builder_cls() -> type[AttentionMetadataBuilder]:
        """The class that turns the runner's batch into this backend's metadata."""
        return AttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's key cache (the value cache has the same shape)."""
        return (num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def validate(cls, head_size: int, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot run the given head size or dtype."""
        if dtype not in cls.supported_dtypes:
            raise ValueError(f"attention backend {cls.name} does not support dtype {dtype}")
        if cls.supported_head_sizes is not None and head_size not in cls.supported_head_sizes:
            raise ValueError(
                f"attention backend {cls.name} supports head sizes {cls.supported_head_sizes}, got {head_size}"
            )

"""Batches for attention tests, laid out the way InputBatch lays them out (the token-by-token definition)."""
from __future__ import annotations

import numpy as np
import torch

from graphserve.attention.backends.base import AttentionInputs

# The geometry of the attention tests: 4 query heads over 2 KV heads (GQA 2:1), head size 16, blocks of 4.
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 4, 2, 16, 4


def random_qkv(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q [num_tokens, NUM_HEADS * HEAD_SIZE], k and v [num_tokens, NUM_KV_HEADS * HEAD_SIZE]."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, NUM_HEADS * HEAD_SIZE, generator=g),
        torch.randn(num_tokens, NUM_KV_HEADS * HEAD_SIZE, generator=g),
        torch.randn(num_tokens, NUM_KV_HEADS * HEAD_SIZE, generator=g),
    )


def attention_inputs(query_lens, seq_lens, block_tables, block_size) -> AttentionInputs:
    """AttentionInputs of sequences with `query_lens` new tokens ending at `seq_lens`, in ragged block tables."""
    width = max(len(t) for t in block_tables)
    table = np.zeros((len(block_tables), width), dtype=np.int32)
    for i, row in enumerate(block_tables):
        table[i, : len(row)] = row
    slots = [table[i, p // block_size] * block_size + p % block_size
             for i, (q, s) in enumerate(zip(query_lens, seq_lens)) for p in range(s - q, s)]
    return AttentionInputs(
        query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_table=table,
        slot_mapping=np.asarray(slots, dtype=np.int64),
    )

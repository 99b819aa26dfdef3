"""Token embedding and LM head, split along the (padded) vocabulary for tensor parallelism."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphserve.layers.linear import copy_checked, divide, set_weight_attrs

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    """Round the vocabulary up to a multiple of `pad_to` (keeps shards equal and GEMMs aligned)."""
    return ((vocab_size + pad_to - 1) // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows [vocab_start_index, vocab_end_index) live on this TP rank.

    The table is padded to a multiple of `padding_size`; padding rows stay zero after loading.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = "",
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.org_vocab_size = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * tp_size)
        self.num_embeddings_per_partition = divide(self.num_embeddings_padded, tp_size)
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.prefix = prefix
        self.vocab_start_index = tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's rows of the [vocab_size, hidden] checkpoint table; zero the padding."""
        if loaded_weight.shape[0] != self.org_vocab_size:
            raise ValueError(f"embedding table has {loaded_weight.shape[0]} rows, expected {self.org_vocab_size}")
        start = min(self.vocab_start_index, self.org_vocab_size)
        num_real = min(self.vocab_end_index, self.org_vocab_size) - start
        copy_checked(param.data[:num_real], loaded_weight.narrow(0, start, num_real))
        param.data[num_real:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # input_ids: [num_tokens]
        """[num_tokens] token ids -> [num_tokens, embedding_dim]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks embed as zeros; the all-reduce fills them in.
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        output = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        torch.distributed.all_reduce(output)
        return output

    def extra_repr(self) -> str:
        """Shapes and TP geometry for print(model)."""
        return (f"num_embeddings={self.org_vocab_size}, padded={self.num_embeddings_padded}, "
                f"embedding_dim={self.embedding_dim}, tp_size={self.tp_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; used through LogitsProcessor, never called directly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, **kwargs: Any):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition, dtype=self.weight.dtype),
                                     requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share the embedding's weight (tie_word_embeddings)."""
        if embed_tokens.weight.shape != self.weight.shape:
            raise ValueError("cannot tie LM head and embedding of different shapes")
        self.weight = embed_tokens.weight
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Not a lookup table: LogitsProcessor applies the head."""
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")

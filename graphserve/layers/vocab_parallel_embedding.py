"""Token embedding and LM head over a vocabulary padded to a multiple of 64 (aligned GEMMs; the rows tensor
parallelism will split)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphserve.layers.linear import copy_checked, set_weight_attrs
from graphserve.quantization.base import QuantizationConfig

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    """Round the vocabulary up to a multiple of `pad_to` (keeps shards equal and GEMMs aligned)."""
    return ((vocab_size + pad_to - 1) // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    """Token embedding; the table is padded to a multiple of `padding_size`, padding rows stay zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.org_vocab_size = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size)
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.params_dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        # A quantized table (GGUF keeps token_embd / output in their blocks), else a dense one.
        self.quant_method = quant_config.get_embedding_method(prefix) if quant_config is not None else None
        if self.quant_method is not None:
            self.quant_method.create_weights(self, self.num_embeddings_padded, embedding_dim, num_embeddings)
            return
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_padded, embedding_dim, dtype=self.params_dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy the [vocab_size, hidden] checkpoint table (or a [vocab_size] bias); zero the padding."""
        num_real = self.org_vocab_size
        if loaded_weight.shape[0] != num_real:
            raise ValueError(f"embedding table has {loaded_weight.shape[0]} rows, expected {num_real}")
        copy_checked(param.data[:num_real], loaded_weight)
        param.data[num_real:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # input_ids: [num_tokens]
        """[num_tokens] token ids -> [num_tokens, embedding_dim]."""
        if self.quant_method is not None:
            return self.quant_method.embedding(self, input_ids, self.params_dtype)
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        """Shapes for print(model)."""
        return (f"num_embeddings={self.org_vocab_size}, padded={self.num_embeddings_padded}, "
                f"embedding_dim={self.embedding_dim}")


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; used through LogitsProcessor, never called directly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, **kwargs: Any):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_padded, dtype=self.params_dtype),
                                     requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> ParallelLMHead:
        """Share the embedding's weight and its quantization (tie_word_embeddings)."""
        if (embed_tokens.num_embeddings_padded, embed_tokens.embedding_dim) != (self.num_embeddings_padded,
                                                                               self.embedding_dim):
            raise ValueError("cannot tie LM head and embedding of different shapes")
        self.weight = embed_tokens.weight
        self.quant_method = embed_tokens.quant_method
        return self

    def linear(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> [num_tokens, padded]
        """The head's matmul (dense, or through its quantization method)."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, hidden_states, self.bias)
        return F.linear(hidden_states, self.weight, self.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Not a lookup table: LogitsProcessor applies the head."""
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")

"""Hidden states -> float32 vocabulary logits through the LM head."""
from __future__ import annotations

import torch
from torch import nn

from graphserve.layers.vocab_parallel_embedding import ParallelLMHead


class LogitsProcessor(nn.Module):
    """Apply the LM head, drop vocab padding, then soft-cap and scale in fp32."""

    def __init__(self, vocab_size: int, scale: float = 1.0, logits_soft_cap: float | None = None):
        super().__init__()
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        self.vocab_size = vocab_size
        self.scale = scale
        self.logits_soft_cap = logits_soft_cap

    def forward(self, lm_head: ParallelLMHead, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [num_tokens, hidden_size]
        """[num_tokens, hidden_size] -> [num_tokens, vocab_size] float32 logits."""
        logits = lm_head.linear(hidden_states)
        # Padding rows are zero, so their logits would be 0, not -inf: they must be cut, not masked.
        logits = logits[..., : self.vocab_size].float()
        if self.logits_soft_cap is not None:
            logits = torch.tanh(logits / self.logits_soft_cap) * self.logits_soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits

    def extra_repr(self) -> str:
        """Settings for print(model)."""
        return f"vocab_size={self.vocab_size}, scale={self.scale}, logits_soft_cap={self.logits_soft_cap}"

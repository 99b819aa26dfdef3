"""RMSNorm with an optional fused residual add (HF LlamaRMSNorm semantics)."""
from __future__ import annotations

import torch
from torch import nn

from graphserve.ops import layernorm as layernorm_ops


class RMSNorm(nn.Module):
    """Root-mean-square norm; with `residual`, also adds it first and returns the new residual."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm(x) * weight, or (rmsnorm(x + residual) * weight, x + residual).

        The fused form works in place, like vLLM: the returned tensors are `x` and `residual` themselves.
        """
        if residual is None:
            out = torch.empty_like(x)
            layernorm_ops.rms_norm(out, x, self.weight, self.eps)
            return out
        layernorm_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"

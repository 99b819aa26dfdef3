"""RMSNorm with an optional fused residual add (HF LlamaRMSNorm semantics), and LayerNorm and Gemma's RMSNorm with
the same calling convention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


class LayerNorm(nn.Module):
    """LayerNorm (weight and bias) in the input dtype, as `nn.LayerNorm`; with `residual`, adds it first and returns
    the new residual too, like RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """layernorm(x), or (layernorm(x + residual), x + residual)."""
        if residual is None:
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        residual = x + residual
        return F.layer_norm(residual, (self.hidden_size,), self.weight, self.bias, self.eps), residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from one and applied in fp32 before the cast,
    (x_normed * (1 + w)).to(dtype), where Llama casts first; with `residual`, adds it first like RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """gemma_rmsnorm(x), or (gemma_rmsnorm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"

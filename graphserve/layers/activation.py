"""Gated MLP activations."""
from __future__ import annotations

import torch
from torch import nn

from graphserve.ops import activation as activation_ops


class SiluAndMul(nn.Module):
    """silu(gate) * up for a packed [gate | up] input, as produced by a merged gate_up_proj."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * I] -> [num_tokens, I]
        """Split the last dim in half and gate the second half with silu of the first."""
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
        activation_ops.silu_and_mul(out, x)
        return out

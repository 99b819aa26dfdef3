"""The sampler's hot path as ops: penalties in place, then temperature and top-k / top-p / min-p filtering.

The torch references are the Sampler's own functions (graphserve/layers/sampler.py), so the CPU path and the
oracle of the device kernels are one piece of code. Both ops only write preallocated tensors and never sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from graphserve.ops._register import register_op


def _apply_penalties_ref(
    logits: torch.Tensor,  # [B, V] float32, penalized in place
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64, right-padded with V
    prompt_token_ids: Optional[torch.Tensor],  # [B, max_prompt_len] int64, right-padded with V; None: no repetition
    presence_penalties: torch.Tensor,  # [B] float32
    frequency_penalties: torch.Tensor,  # [B] float32
    repetition_penalties: torch.Tensor,  # [B] float32
) -> None:
    """logits <- repetition (HF), then frequency and presence (OpenAI) penalties."""
    # Imported here: the sampler module imports this one to call the ops.
    from graphserve.layers.sampler import penalize_logits

    logits.copy_(penalize_logits(logits, output_token_ids, prompt_token_ids, presence_penalties,
                                 frequency_penalties, repetition_penalties))


def _apply_sampling_filters_ref(
    out: torch.Tensor,  # [B, V] float32
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B] float32
    top_k: Optional[torch.Tensor],  # [B] int64 in [1, V]; V = off
    top_p: Optional[torch.Tensor],  # [B] float32 in (0, 1]; 1 = off
    min_p: Optional[torch.Tensor],  # [B] float32 in [0, 1]; 0 = off
) -> None:
    """out <- logits / temperature with -inf outside each row's top-k, then top-p nucleus, then min-p set."""
    from graphserve.layers.sampler import apply_min_p, apply_top_k_top_p

    filtered = apply_top_k_top_p(logits / temperature.unsqueeze(1), top_k, top_p)
    if min_p is not None:
        filtered = apply_min_p(filtered, min_p)
    out.copy_(filtered)


register_op("apply_penalties", _apply_penalties_ref, mutates_args=("logits",))
register_op("apply_sampling_filters", _apply_sampling_filters_ref, mutates_args=("out",))


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64
    prompt_token_ids: Optional[torch.Tensor],  # [B, max_prompt_len] int64
    presence_penalties: torch.Tensor,  # [B] float32
    frequency_penalties: torch.Tensor,  # [B] float32
    repetition_penalties: torch.Tensor,  # [B] float32
) -> None:
    """Penalize `logits` in place (token ids right-padded with V)."""
    torch.ops.graphserve.apply_penalties(logits, output_token_ids, prompt_token_ids, presence_penalties,
                                         frequency_penalties, repetition_penalties)


def apply_sampling_filters(
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B] float32
    top_k: Optional[torch.Tensor],  # [B] int64
    top_p: Optional[torch.Tensor],  # [B] float32
    min_p: Optional[torch.Tensor],  # [B] float32
) -> torch.Tensor:
    """A new [B, V] tensor: logits / temperature, -inf where top-k, top-p or min-p drops the token."""
    out = torch.empty_like(logits)
    torch.ops.graphserve.apply_sampling_filters(out, logits, temperature, top_k, top_p, min_p)
    return out

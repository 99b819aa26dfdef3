"""The sampler's hot path as ops: penalties in place, then temperature and top-k / top-p / min-p filtering.

The torch references below are what the CPU runs and the oracle of the device kernels (ops/triton/sampling.py);
the Sampler (graphserve/sample/) calls the ops. Both ops only write preallocated tensors and never sync.
"""
from __future__ import annotations

import torch

from graphserve.ops._register import register_op


def _bin_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id per row; token_ids [B, L] right-padded with vocab_size → [B, V] int32."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def penalize_logits(
    logits: torch.Tensor,  # [B, V]
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64, right-padded with V
    prompt_token_ids: torch.Tensor | None,  # [B, max_prompt_len] int64, right-padded with V; None: no repetition
    presence_penalties: torch.Tensor,  # [B] float32
    frequency_penalties: torch.Tensor,  # [B] float32
    repetition_penalties: torch.Tensor,  # [B] float32
) -> torch.Tensor:
    """Repetition (HF: prompt + output tokens, positive logits divided, negative multiplied), then presence and
    frequency (OpenAI: output tokens only, logit -= frequency * count + presence * (count > 0))."""
    vocab_size = logits.shape[-1]
    output_counts = _bin_counts(output_token_ids, vocab_size)  # [B, V]
    if prompt_token_ids is not None:
        seen = (_bin_counts(prompt_token_ids, vocab_size) > 0) | (output_counts > 0)
        penalty = repetition_penalties.unsqueeze(1).expand_as(logits)
        penalty = torch.where(seen, penalty, torch.ones_like(penalty))
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits -= frequency_penalties.unsqueeze(1) * output_counts
    logits -= presence_penalties.unsqueeze(1) * (output_counts > 0)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V]
    top_k: torch.Tensor | None,  # [B] int64 in [1, V]
    top_p: torch.Tensor | None,  # [B] float32 in (0, 1]
) -> torch.Tensor:
    """Mask to -inf what falls outside each row's top-k and then outside its top-p nucleus.

    Ties with the k-th largest logit are kept. The nucleus is the smallest set of most likely tokens whose
    probability reaches top_p, plus the tokens tied with its least likely one; the most likely token always
    survives. Keeping the whole tie makes the set independent of how the sort orders equal logits (backends
    differ), and lets the CUDA kernel find it by threshold search, without a sort.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (logits.shape[-1] - top_k).unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # top_p = 1 is off: without the second term such rows would lose their zero-probability tokens
        # only when another row of the batch uses top-p.
        drop = (cumulative <= (1.0 - top_p).unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, -1] = False
        smallest_kept = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < smallest_kept, float("-inf"))
    return logits.scatter(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability. logits: [B, V]."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_penalties_ref(
    logits: torch.Tensor,  # [B, V] float32, penalized in place
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64, right-padded with V
    prompt_token_ids: torch.Tensor | None,  # [B, max_prompt_len] int64, right-padded with V; None: no repetition
    presence_penalties: torch.Tensor,  # [B] float32
    frequency_penalties: torch.Tensor,  # [B] float32
    repetition_penalties: torch.Tensor,  # [B] float32
) -> None:
    """logits <- repetition (HF), then frequency and presence (OpenAI) penalties."""
    logits.copy_(penalize_logits(logits, output_token_ids, prompt_token_ids, presence_penalties,
                                 frequency_penalties, repetition_penalties))


def _apply_sampling_filters_ref(
    out: torch.Tensor,  # [B, V] float32
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B] float32
    top_k: torch.Tensor | None,  # [B] int64 in [1, V]; V = off
    top_p: torch.Tensor | None,  # [B] float32 in (0, 1]; 1 = off
    min_p: torch.Tensor | None,  # [B] float32 in [0, 1]; 0 = off
) -> None:
    """out <- logits / temperature with -inf outside each row's top-k, then top-p nucleus, then min-p set."""
    filtered = apply_top_k_top_p(logits / temperature.unsqueeze(1), top_k, top_p)
    if min_p is not None:
        filtered = apply_min_p(filtered, min_p)
    out.copy_(filtered)


register_op("apply_penalties", _apply_penalties_ref, mutates_args=("logits",))
register_op("apply_sampling_filters", _apply_sampling_filters_ref, mutates_args=("out",))


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32
    output_token_ids: torch.Tensor,  # [B, max_output_len] int64
    prompt_token_ids: torch.Tensor | None,  # [B, max_prompt_len] int64
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
    top_k: torch.Tensor | None,  # [B] int64
    top_p: torch.Tensor | None,  # [B] float32
    min_p: torch.Tensor | None,  # [B] float32
) -> torch.Tensor:
    """A new [B, V] tensor: logits / temperature, -inf where top-k, top-p or min-p drops the token."""
    out = torch.empty_like(logits)
    torch.ops.graphserve.apply_sampling_filters(out, logits, temperature, top_k, top_p, min_p)
    return out

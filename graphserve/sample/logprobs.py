"""Top-k logprobs with the chosen token first and its rank: sampled tokens and prompt positions alike."""
from __future__ import annotations

import torch


def compute_topk_logprobs(
    logprobs: torch.Tensor,  # [N, V] float32
    token_ids: torch.Tensor,  # [N] int
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen token first, then the top-k: (token_ids [N, 1+k] int64, logprobs [N, 1+k], ranks [N] int64).

    The rank is 1 + the number of tokens strictly more likely than the chosen one. k is capped at V.
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(-1)  # [N, 1]
    chosen = logprobs.gather(-1, token_ids)  # [N, 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    k = min(k, logprobs.shape[-1])
    if k <= 0:
        return token_ids, chosen, ranks
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    return torch.cat([token_ids, topk_ids], dim=-1), torch.cat([chosen, topk_logprobs], dim=-1), ranks

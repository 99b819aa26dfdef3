"""N-gram prompt lookup (vLLM's `method: "ngram"`): drafts are the tokens that followed the most recent earlier
occurrence of the context's longest matching suffix n-gram (n from `prompt_lookup_max` down to `prompt_lookup_min`).

It costs no model: copy-heavy generations (summaries, rewrites, code edits, extraction from a given passage) repeat
spans of their own context, and each accepted draft token saves a decode step. Pure numpy on the host."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphserve.spec_decode.config import SpeculativeConfig


class NgramProposer:
    """Proposes up to `num_speculative_tokens` draft tokens per request from its own token history."""

    def __init__(self, config: SpeculativeConfig) -> None:
        if config.method != "ngram":
            raise ValueError(f"NgramProposer needs method 'ngram', got {config.method!r}")
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: Sequence[int] | np.ndarray, max_tokens: int | None = None) -> list[int]:
        """Draft tokens for one request whose known tokens are `token_ids` (prompt + output); at most
        `max_tokens` (e.g. what is left of the request's max_tokens), [] when no n-gram matches."""
        limit = self.k if max_tokens is None else min(self.k, max_tokens)
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        if limit <= 0 or length < self.min_n + 1:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            # Windows that start early enough to be followed by at least one token of the context.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if len(starts):
                follow = int(starts[-1]) + n  # the most recent occurrence
                return tokens[follow:follow + limit].tolist()
        return []

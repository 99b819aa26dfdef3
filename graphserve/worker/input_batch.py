"""The runner's persistent per-request state and the flat, padded-free batch it builds each step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from graphserve.worker.sampling_metadata import SamplingRequestState

if TYPE_CHECKING:
    from graphserve.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """Everything the runner keeps about a request between steps (it never sees strings)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: "SamplingParams"
    block_ids: list[int]
    num_computed_tokens: int
    # Shares the token lists above, so a sampled token is appended once for both views.
    sampling: SamplingRequestState = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sampling = SamplingRequestState(
            req_id=self.req_id,
            sampling_params=self.sampling_params,
            prompt_token_ids=self.prompt_token_ids,
            output_token_ids=self.output_token_ids,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Token ids of positions [start, end) across prompt and output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


@dataclass
class BatchInputs:
    """Host-side (numpy) inputs of one step, in scheduling order. Slices of persistent buffers."""

    req_ids: list[str]
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_lens: np.ndarray  # [num_reqs] int32
    seq_lens: np.ndarray  # [num_reqs] int32, context length after this step
    query_start_loc: np.ndarray  # [num_reqs + 1] int32
    block_table: np.ndarray  # [num_reqs, max_blocks] int32
    sampling_req_indices: list[int]  # requests whose last scheduled token completes their known tokens
    logits_indices: np.ndarray  # [num_sampling] int64, flat token index of each sampling request's last token


class InputBatch:
    """Builds the flat batch from scheduled requests into preallocated numpy buffers (no per-step allocs)."""

    def __init__(self, max_num_tokens: int, max_num_reqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_blocks_per_req = -(-max_model_len // block_size)
        self._input_ids = np.zeros(max_num_tokens, dtype=np.int64)
        self._positions = np.zeros(max_num_tokens, dtype=np.int64)
        self._slot_mapping = np.zeros(max_num_tokens, dtype=np.int64)
        self._query_lens = np.zeros(max_num_reqs, dtype=np.int32)
        self._seq_lens = np.zeros(max_num_reqs, dtype=np.int32)
        self._query_start_loc = np.zeros(max_num_reqs + 1, dtype=np.int32)
        self._block_table = np.zeros((max_num_reqs, self.max_blocks_per_req), dtype=np.int32)
        self._arange = np.arange(max(max_num_tokens, max_model_len), dtype=np.int64)

    def prepare(self, states: list[CachedRequestState], num_scheduled: list[int]) -> BatchInputs:
        """Flatten the scheduled chunk of every request into one token dimension."""
        num_reqs = len(states)
        total = 0
        sampling: list[int] = []
        logits_idx: list[int] = []
        bs = self.block_size
        self._query_start_loc[0] = 0
        for i, (st, n) in enumerate(zip(states, num_scheduled)):
            start = st.num_computed_tokens
            end = start + n
            pos = self._positions[total : total + n]
            np.add(self._arange[:n], start, out=pos)
            self._input_ids[total : total + n] = st.token_at(start, end)
            nb = len(st.block_ids)
            row = self._block_table[i]
            row[:nb] = st.block_ids
            block_idx = pos // bs
            self._slot_mapping[total : total + n] = row[block_idx] * bs + pos % bs
            self._query_lens[i] = n
            self._seq_lens[i] = end
            total += n
            self._query_start_loc[i + 1] = total
            if end >= st.num_tokens:
                sampling.append(i)
                logits_idx.append(total - 1)
        return BatchInputs(
            req_ids=[st.req_id for st in states],
            input_ids=self._input_ids[:total],
            positions=self._positions[:total],
            slot_mapping=self._slot_mapping[:total],
            query_lens=self._query_lens[:num_reqs],
            seq_lens=self._seq_lens[:num_reqs],
            query_start_loc=self._query_start_loc[: num_reqs + 1],
            block_table=self._block_table[:num_reqs],
            sampling_req_indices=sampling,
            logits_indices=np.asarray(logits_idx, dtype=np.int64),
        )

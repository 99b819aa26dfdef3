"""The runner's per-request state (kept across steps) and the flat, unpadded batch it builds each step."""
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
    """Host-side (numpy) inputs of one step, in scheduling order."""

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
    # Inputs still on the device (async scheduling): flat token index ← row of the previous step's sampled ids.
    prev_token_indices: np.ndarray  # [k] int64
    prev_token_rows: np.ndarray  # [k] int64


class InputBatch:
    """Builds the flat batch of one step from the scheduled requests.

    Decode-only requests (one token) take a scalar fast path; everything is gathered in Python lists and turned
    into numpy arrays once, so the per-request cost is a handful of list appends.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def prepare(
        self, states: list[CachedRequestState], num_scheduled: list[int], pending: dict[str, int] | None = None
    ) -> BatchInputs:
        """Flatten the scheduled chunk of every request into one token dimension.

        `pending` maps the requests for which the step still in flight samples a token to that token's row in
        its output: the token is this step's input at position num_tokens, filled in on the device (here 0).
        """
        bs = self.block_size
        pending = pending or {}
        prev_idx: list[int] = []
        prev_rows: list[int] = []
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        sampling: list[int] = []
        logits_idx: list[int] = []
        for i, (st, n) in enumerate(zip(states, num_scheduled)):
            start = st.num_computed_tokens
            end = start + n
            blocks = st.block_ids
            num_known = st.num_tokens
            if end > num_known:  # the last input is the in-flight step's sample
                if end != num_known + 1 or st.req_id not in pending:
                    raise RuntimeError(f"request {st.req_id!r}: positions {start}..{end - 1} scheduled but only "
                                       f"{num_known} tokens known and none in flight")
                prev_idx.append(len(input_ids) + n - 1)
                prev_rows.append(pending[st.req_id])
            if n == 1:
                prompt_len = len(st.prompt_token_ids)
                if start >= num_known:
                    input_ids.append(0)
                else:
                    input_ids.append(
                        st.output_token_ids[start - prompt_len] if start >= prompt_len else st.prompt_token_ids[start]
                    )
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                input_ids.extend(st.token_at(start, min(end, num_known)))
                if end > num_known:
                    input_ids.append(0)
                pos = range(start, end)
                positions.extend(pos)
                slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + n)
            if end >= num_known + (st.req_id in pending):
                sampling.append(i)
                logits_idx.append(query_start_loc[-1] - 1)
        width = max(len(st.block_ids) for st in states)
        pad = [0] * width
        block_table = np.array([st.block_ids + pad[len(st.block_ids):] for st in states], dtype=np.int32)
        query_start_loc_np = np.asarray(query_start_loc, dtype=np.int32)
        return BatchInputs(
            req_ids=[st.req_id for st in states],
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=np.asarray(positions, dtype=np.int64),
            slot_mapping=np.asarray(slots, dtype=np.int64),
            query_lens=np.diff(query_start_loc_np),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            query_start_loc=query_start_loc_np,
            block_table=block_table,
            sampling_req_indices=sampling,
            logits_indices=np.asarray(logits_idx, dtype=np.int64),
            prev_token_indices=np.asarray(prev_idx, dtype=np.int64),
            prev_token_rows=np.asarray(prev_rows, dtype=np.int64),
        )

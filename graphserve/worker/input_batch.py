"""The runner's per-request state (kept across steps) and the flat, unpadded batch it builds each step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from graphserve.attention.backends.base import PAD_SLOT_ID, AttentionInputs
from graphserve.sample.metadata import SamplingRequestState, needs_output_token_ids

if TYPE_CHECKING:
    from graphserve.lora.request import LoRARequest
    from graphserve.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """Everything the runner keeps about a request between steps (it never sees strings)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    lora_request: LoRARequest | None = None
    # Shares the token lists above, so a sampled token is appended once for both views.
    sampling: SamplingRequestState = field(init=False, repr=False)
    needs_output_token_ids: bool = field(init=False, repr=False)
    # Its row of InputBatch's persistent block table (-1: none yet) and how many of its blocks the row holds.
    table_row: int = field(default=-1, init=False, repr=False)
    num_table_blocks: int = field(default=0, init=False, repr=False)
    # Speculative decoding with a draft model: positions whose draft KV holds the request's true tokens.
    num_draft_computed: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        # Sampling reads its generated tokens (async scheduling waits for a token still in flight).
        self.needs_output_token_ids = needs_output_token_ids(self.sampling_params)
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
class BatchInputs(AttentionInputs):
    """Host-side (numpy) inputs of one step, in scheduling order: the attention layout plus the model's inputs."""

    req_ids: list[str]
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    query_lens: np.ndarray  # [num_reqs] int32
    sampling_req_indices: list[int]  # requests whose last scheduled token completes their known tokens
    # Flat token index of each sampling request's last token, or with drafts of its last 1 + k tokens (the k
    # draft positions and the bonus position, in order): [num_sampling + total drafts] int64.
    logits_indices: np.ndarray
    # Inputs still on the device (async scheduling): flat token index ← row of the previous step's sampled ids.
    prev_token_indices: np.ndarray  # [k] int64
    prev_token_rows: np.ndarray  # [k] int64
    # Speculative decoding: the draft tokens each sampling request verifies (aligned with sampling_req_indices),
    # or None when no request of the step has drafts.
    spec_token_ids: list[list[int]] | None = None


class InputBatch:
    """Builds the flat batch of one step from the scheduled requests.

    Block tables live in one persistent array, a row per request, updated incrementally: a row is written when
    its request first appears and then only with the blocks it gains. Positions, slots, sequence lengths and the
    sampling rows are computed with numpy over the whole batch; the per-request Python work is fetching the
    input token ids.
    """

    def __init__(self, block_size: int, max_num_reqs: int = 64, max_blocks_per_req: int = 64) -> None:
        self.block_size = block_size
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def release(self, state: CachedRequestState) -> None:
        """Give the request's block-table row back (it finished, was preempted or aborted)."""
        if state.table_row >= 0:
            self._free_rows.append(state.table_row)
            state.table_row = -1

    def _sync_row(self, state: CachedRequestState) -> int:
        """The request's row of the block table, with any blocks it gained since the last step written in."""
        row = state.table_row
        if row < 0:
            if not self._free_rows:
                old = self.block_table.shape[0]
                self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
                self._free_rows = list(range(2 * old - 1, old - 1, -1))
            row = state.table_row = self._free_rows.pop()
            self.block_table[row] = 0  # no stale block ids of the row's previous owner
            state.num_table_blocks = 0
        blocks = state.block_ids
        num_blocks = len(blocks)
        if num_blocks != state.num_table_blocks:
            if num_blocks > self.block_table.shape[1]:
                width = max(num_blocks, 2 * self.block_table.shape[1])
                grown = np.zeros((self.block_table.shape[0], width), dtype=np.int32)
                grown[:, : self.block_table.shape[1]] = self.block_table
                self.block_table = grown
            self.block_table[row, state.num_table_blocks : num_blocks] = blocks[state.num_table_blocks :]
            state.num_table_blocks = num_blocks
        return row

    def prepare(
        self, states: list[CachedRequestState], num_scheduled: list[int], pending: dict[str, int] | None = None,
        spec_tokens: list[list[int]] | None = None,
    ) -> BatchInputs:
        """Flatten the scheduled chunk of every request into one token dimension.

        `pending` maps the requests for which the step still in flight samples a token to that token's row in
        its output: the token is this step's input at position num_tokens, filled in on the device (here 0).
        `spec_tokens` (aligned with `states`) holds the draft tokens a request verifies: its last scheduled
        tokens, after its known ones.
        """
        pending = pending or {}
        num_drafts = [len(d) for d in spec_tokens] if spec_tokens else None
        num_reqs = len(states)
        input_ids: list[int] = []
        rows: list[int] = []
        starts: list[int] = []
        num_known: list[int] = []  # tokens on the host (+1 when one is in flight)
        prev_idx: list[int] = []
        prev_rows: list[int] = []
        sync_row = self._sync_row
        for i, (st, n) in enumerate(zip(states, num_scheduled)):
            start = st.num_computed_tokens
            rows.append(sync_row(st))
            starts.append(start)
            prompt = st.prompt_token_ids
            output = st.output_token_ids
            known = len(prompt) + len(output)
            end = start + n
            if num_drafts and num_drafts[i]:  # a verify step: the known tokens from start, then the drafts
                if end != known + num_drafts[i]:
                    raise RuntimeError(f"request {st.req_id!r}: {n} tokens from position {start} scheduled with "
                                       f"{num_drafts[i]} drafts, but {known} tokens are known")
                input_ids.extend(st.token_at(start, known))
                input_ids.extend(spec_tokens[i])
                num_known.append(end)
                continue
            if end > known:  # the last input is the in-flight step's sample
                if end != known + 1 or st.req_id not in pending:
                    raise RuntimeError(f"request {st.req_id!r}: positions {start}..{end - 1} scheduled but only "
                                       f"{known} tokens known and none in flight")
                prev_idx.append(len(input_ids) + n - 1)
                prev_rows.append(pending[st.req_id])
                num_known.append(known + 1)
            else:
                num_known.append(known)
            if n == 1:
                if start >= known:
                    input_ids.append(0)
                else:
                    p = len(prompt)
                    input_ids.append(output[start - p] if start >= p else prompt[start])
            else:
                input_ids.extend(st.token_at(start, min(end, known)))
                if end > known:
                    input_ids.append(0)
        query_lens = np.asarray(num_scheduled, dtype=np.int32)
        starts_np = np.asarray(starts, dtype=np.int64)
        rows_np = np.asarray(rows, dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        seq_lens = starts_np + query_lens
        num_tokens = int(query_start_loc[-1])
        if num_tokens == num_reqs:  # every request computes one token (a decode step)
            positions, token_rows = starts_np, rows_np
        else:
            offsets = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1], query_lens)
            positions = np.repeat(starts_np, query_lens) + offsets
            token_rows = np.repeat(rows_np, query_lens)
        bs = self.block_size
        slot_mapping = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        sampling = seq_lens >= np.asarray(num_known, dtype=np.int64)
        sampling_req_indices = np.flatnonzero(sampling).tolist()
        logits_indices = (query_start_loc[1:][sampling] - 1).astype(np.int64)
        step_spec_tokens = None
        if num_drafts and any(num_drafts):
            step_spec_tokens = [spec_tokens[i] for i in sampling_req_indices]
            logits_indices = _positions_with_drafts(logits_indices, [len(d) for d in step_spec_tokens])
        width = int(max(st.num_table_blocks for st in states))
        return BatchInputs(
            req_ids=[st.req_id for st in states],
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=positions,
            slot_mapping=slot_mapping,
            query_lens=query_lens,
            seq_lens=seq_lens.astype(np.int32),
            query_start_loc=query_start_loc,
            block_table=self.block_table[rows_np, :width],
            sampling_req_indices=sampling_req_indices,
            logits_indices=logits_indices,
            prev_token_indices=np.asarray(prev_idx, dtype=np.int64),
            prev_token_rows=np.asarray(prev_rows, dtype=np.int64),
            spec_token_ids=step_spec_tokens,
        )


def _positions_with_drafts(last_indices: np.ndarray, num_drafts: list[int]) -> np.ndarray:
    """Per sampling request, its last 1 + k flat token indices (k drafts then the bonus position), concatenated."""
    counts = np.asarray(num_drafts, dtype=np.int64) + 1
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(last_indices - counts + 1, counts) + offsets


def uniform_layout(batch: BatchInputs, query_len: int) -> BatchInputs:
    """The same batch with every request on exactly `query_len` token rows (request i on rows i * query_len ...),
    for a verify graph: a request with fewer tokens is padded after its last one with rows that write no KV
    (slot -1) and read token 0 at position 0, so causal attention keeps them out of every real token's view.
    Its sequence length grows by its padding, so its real tokens keep their positions (seq_len - query_len is the
    prefix). Logits and in-flight token indices follow their tokens."""
    query_lens = batch.query_lens.astype(np.int64)
    num_reqs = len(query_lens)
    if num_reqs and int(query_lens.max()) > query_len:
        raise ValueError(f"a request of {int(query_lens.max())} tokens does not fit {query_len} rows")
    starts = batch.query_start_loc[:-1].astype(np.int64)
    # New row of every old token: its request's first row plus its offset inside the request.
    request_of = np.repeat(np.arange(num_reqs, dtype=np.int64), query_lens)
    new_row = request_of * query_len + (np.arange(batch.num_tokens, dtype=np.int64) - starts[request_of])
    num_tokens = num_reqs * query_len
    input_ids = np.zeros(num_tokens, dtype=np.int64)
    positions = np.zeros(num_tokens, dtype=np.int64)
    slot_mapping = np.full(num_tokens, PAD_SLOT_ID, dtype=np.int64)
    input_ids[new_row] = batch.input_ids
    positions[new_row] = batch.positions
    slot_mapping[new_row] = batch.slot_mapping
    return BatchInputs(
        req_ids=batch.req_ids,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_lens=np.full(num_reqs, query_len, dtype=np.int32),
        seq_lens=(batch.seq_lens + (query_len - query_lens)).astype(np.int32),
        query_start_loc=np.arange(num_reqs + 1, dtype=np.int32) * query_len,
        block_table=batch.block_table,
        sampling_req_indices=batch.sampling_req_indices,
        logits_indices=new_row[batch.logits_indices],
        prev_token_indices=new_row[batch.prev_token_indices],
        prev_token_rows=batch.prev_token_rows,
        spec_token_ids=batch.spec_token_ids,
    )

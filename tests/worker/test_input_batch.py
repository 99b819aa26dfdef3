"""InputBatch: the flat batch of a step, over a persistent block table updated incrementally."""
import random

import numpy as np
import pytest

from graphserve.sampling_params import SamplingParams
from graphserve.worker.input_batch import CachedRequestState, InputBatch, uniform_layout

BS = 4


def _state(req_id: str, prompt_len: int, num_output: int, num_computed: int, first_block: int) -> CachedRequestState:
    num_tokens = prompt_len + num_output
    num_blocks = -(-(num_tokens + 1) // BS)
    return CachedRequestState(
        req_id=req_id,
        prompt_token_ids=[100 + i for i in range(prompt_len)],
        output_token_ids=[500 + i for i in range(num_output)],
        sampling_params=SamplingParams(),
        block_ids=list(range(first_block, first_block + num_blocks)),
        num_computed_tokens=num_computed,
    )


def _naive(states, num_scheduled):
    """What the batch must hold, computed token by token."""
    ids, pos, slots, sampling = [], [], [], []
    for i, (st, n) in enumerate(zip(states, num_scheduled)):
        tokens = st.prompt_token_ids + st.output_token_ids
        for p in range(st.num_computed_tokens, st.num_computed_tokens + n):
            ids.append(tokens[p])
            pos.append(p)
            slots.append(st.block_ids[p // BS] * BS + p % BS)
        if st.num_computed_tokens + n >= len(tokens):
            sampling.append(i)
    return ids, pos, slots, sampling


def test_mixed_batch_matches_the_token_by_token_definition():
    states = [_state("a", 10, 0, 0, 0), _state("b", 7, 3, 9, 20), _state("c", 30, 0, 12, 40), _state("d", 5, 9, 13, 60)]
    num_scheduled = [10, 1, 8, 1]  # whole prefill, decode, partial prefill chunk, decode
    batch = InputBatch(BS, max_num_reqs=2, max_blocks_per_req=2).prepare(states, num_scheduled)  # both grow
    ids, pos, slots, sampling = _naive(states, num_scheduled)
    assert batch.input_ids.tolist() == ids and batch.positions.tolist() == pos
    assert batch.slot_mapping.tolist() == slots
    assert batch.sampling_req_indices == sampling == [0, 1, 3]
    assert batch.logits_indices.tolist() == [9, 10, 19]
    assert batch.query_start_loc.tolist() == [0, 10, 11, 19, 20]
    assert batch.seq_lens.tolist() == [10, 10, 20, 14]
    width = max(len(st.block_ids) for st in states)
    for st, row in zip(states, batch.block_table):
        assert row.tolist() == st.block_ids + [0] * (width - len(st.block_ids))


def test_rows_are_updated_incrementally_and_reused_clean():
    input_batch = InputBatch(BS, max_num_reqs=2, max_blocks_per_req=8)
    a, b = _state("a", 6, 1, 6, 0), _state("b", 6, 1, 6, 30)
    input_batch.prepare([a, b], [1, 1])
    rows = (a.table_row, b.table_row)
    a.block_ids.append(99)  # a new block for a (the scheduler's new_block_ids)
    a.output_token_ids.append(7)
    a.num_computed_tokens = 7
    batch = input_batch.prepare([a, b], [1, 1])
    assert (a.table_row, b.table_row) == rows and a.num_table_blocks == 3
    assert batch.block_table[0].tolist() == a.block_ids
    input_batch.release(a)
    assert a.table_row == -1
    c = _state("c", 2, 0, 0, 50)  # takes a's row: none of a's blocks may remain in it
    batch = input_batch.prepare([c, b], [2, 1])
    assert c.table_row == rows[0]
    assert input_batch.block_table[c.table_row].tolist() == c.block_ids + [0] * 7
    assert batch.slot_mapping.tolist() == _naive([c, b], [2, 1])[2]


def test_pending_token_is_a_device_input():
    st = _state("a", 5, 2, 6, 0)  # positions 0..6 known; 6 computed; the step in flight samples position 7
    st.num_computed_tokens = 7
    batch = InputBatch(BS).prepare([st], [1], pending={"a": 3})
    assert batch.input_ids.tolist() == [0] and batch.positions.tolist() == [7]
    assert batch.prev_token_indices.tolist() == [0] and batch.prev_token_rows.tolist() == [3]
    assert batch.sampling_req_indices == [0]
    with pytest.raises(RuntimeError, match="none in flight"):
        InputBatch(BS).prepare([st], [1])


def test_random_batches_match_the_definition():
    rng = random.Random(0)
    input_batch = InputBatch(BS, max_num_reqs=4, max_blocks_per_req=4)
    live: dict[str, CachedRequestState] = {}
    for step in range(60):
        for req_id in rng.sample(sorted(live), k=min(len(live), rng.randrange(3))):
            input_batch.release(live.pop(req_id))
        for _ in range(rng.randrange(4)):
            prompt_len = rng.randrange(1, 40)
            live[f"r{step}_{_}"] = _state(f"r{step}_{_}", prompt_len, 0, rng.randrange(prompt_len), rng.randrange(500))
        if not live:
            continue
        states = list(live.values())
        rng.shuffle(states)
        num_scheduled = [st.num_tokens - st.num_computed_tokens for st in states]
        batch = input_batch.prepare(states, num_scheduled)
        ids, pos, slots, sampling = _naive(states, num_scheduled)
        assert batch.input_ids.tolist() == ids and batch.positions.tolist() == pos
        assert batch.slot_mapping.tolist() == slots and batch.sampling_req_indices == sampling
        for st in states:  # decode on: one more token and sometimes a new block
            st.num_computed_tokens = st.num_tokens
            st.output_token_ids.append(rng.randrange(1000))
            if (st.num_tokens + 1) > len(st.block_ids) * BS:
                st.block_ids.append(rng.randrange(500))
    assert np.all(input_batch.block_table >= 0)


def test_drafts_follow_the_known_tokens_and_every_scored_position_is_a_logits_index():
    # a: decode with 3 drafts; b: a partial prefill (no drafts); c: decode without drafts; d: decode with 1 draft.
    states = [_state("a", 5, 2, 6, 0), _state("b", 9, 0, 0, 10), _state("c", 3, 1, 3, 20), _state("d", 4, 3, 6, 30)]
    for st in states:
        st.block_ids.extend(range(st.block_ids[-1] + 1, st.block_ids[-1] + 3))  # room for the lookahead
    spec = [[7, 8, 9], [], [], [11]]
    num_scheduled = [1 + 3, 4, 1, 1 + 1]
    batch = InputBatch(BS, max_num_reqs=4, max_blocks_per_req=8).prepare(states, num_scheduled, None, spec)
    assert batch.input_ids.tolist() == [501, 7, 8, 9, 100, 101, 102, 103, 500, 502, 11]
    assert batch.positions.tolist() == [6, 7, 8, 9, 0, 1, 2, 3, 3, 6, 7]
    assert batch.sampling_req_indices == [0, 2, 3]
    assert batch.spec_token_ids == [[7, 8, 9], [], [11]]
    assert batch.logits_indices.tolist() == [0, 1, 2, 3, 8, 9, 10]
    a = states[0]
    assert batch.slot_mapping[:4].tolist() == [a.block_ids[p // BS] * BS + p % BS for p in range(6, 10)]
    with pytest.raises(RuntimeError, match="drafts"):
        InputBatch(BS, max_num_reqs=4).prepare([_state("x", 5, 2, 6, 0)], [3], None, [[7]])


def test_uniform_layout_puts_every_request_on_the_verify_graph_rows():
    # a: 3 drafts (4 tokens); b: a 4-token prefill chunk (no sample); c: decode without drafts; d: 1 draft.
    states = [_state("a", 5, 2, 6, 0), _state("b", 9, 0, 0, 10), _state("c", 3, 1, 3, 20), _state("d", 4, 3, 6, 30)]
    for st in states:
        st.block_ids.extend(range(st.block_ids[-1] + 1, st.block_ids[-1] + 3))
    batch = InputBatch(BS, max_num_reqs=4, max_blocks_per_req=8).prepare(
        states, [4, 4, 1, 2], None, [[7, 8, 9], [], [], [11]])
    flat = uniform_layout(batch, 4)
    pad = -1
    assert flat.input_ids.tolist() == [501, 7, 8, 9, 100, 101, 102, 103, 500, 0, 0, 0, 502, 11, 0, 0]
    assert flat.positions.tolist() == [6, 7, 8, 9, 0, 1, 2, 3, 3, 0, 0, 0, 6, 7, 0, 0]
    assert flat.slot_mapping.tolist() == (batch.slot_mapping[:8].tolist() + [batch.slot_mapping[8], pad, pad, pad]
                                          + batch.slot_mapping[9:].tolist() + [pad, pad])
    assert flat.query_start_loc.tolist() == [0, 4, 8, 12, 16] and flat.query_lens.tolist() == [4] * 4
    # The prefix (seq_len - query_len) of every request is unchanged: its real tokens keep their positions.
    assert (flat.seq_lens - flat.query_lens).tolist() == (batch.seq_lens - batch.query_lens).tolist() == [6, 0, 3, 6]
    assert flat.logits_indices.tolist() == [0, 1, 2, 3, 8, 12, 13]  # the same tokens, in their new rows
    assert flat.input_ids[flat.logits_indices].tolist() == batch.input_ids[batch.logits_indices].tolist()
    assert flat.sampling_req_indices == batch.sampling_req_indices and flat.spec_token_ids == batch.spec_token_ids
    with pytest.raises(ValueError, match="does not fit 3 rows"):
        uniform_layout(batch, 3)

"""reshape_and_cache and paged_attention against a dense (unpaged) reference with an explicit mask."""
import random

import pytest
import torch

from graphserve.ops.attention import paged_attention, reshape_and_cache

BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 8, 2, 16  # GQA 4:1
# (query_len, seq_len): decodes at seq_len 1 and multiples of the block size +-1, a full prefill,
# prefill chunks on top of cached prefixes.
BATCH = [(1, 1), (1, 3), (1, 4), (1, 5), (1, 8), (1, 13), (9, 9), (5, 17), (3, 12), (4, 4)]


def _paged_batch(batch, dtype, seed=0):
    """Random dense per-sequence K/V, copied into a paged cache through shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // BLOCK_SIZE) for _, s in batch]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    physical = list(range(num_blocks))
    random.Random(seed).shuffle(physical)
    # Garbage everywhere first: only blocks in a block table may influence the result.
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=g).to(dtype) * 100
    value_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=g).to(dtype) * 100
    max_blocks = max(blocks_per_seq) + 1
    block_table = torch.full((len(batch), max_blocks), 9999, dtype=torch.int32)  # padding is never read
    keys, values, queries = [], [], []
    for b, (q_len, s) in enumerate(batch):
        ids = [physical.pop() for _ in range(blocks_per_seq[b])]
        block_table[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(s, NUM_KV_HEADS, HEAD_SIZE, generator=g).to(dtype)
        v = torch.randn(s, NUM_KV_HEADS, HEAD_SIZE, generator=g).to(dtype)
        for pos in range(s):
            key_cache[ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = k[pos]
            value_cache[ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = v[pos]
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(q_len, NUM_HEADS, HEAD_SIZE, generator=g).to(dtype))
    q_lens = [q for q, _ in batch]
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in batch], dtype=torch.int32)
    return queries, keys, values, key_cache, value_cache, block_table, seq_lens, query_start_loc


def _dense_reference(queries, keys, values, scale, window, soft_cap=0.0, alibi=None):
    """Per sequence and query token: softmax over the explicitly listed visible keys, in float64 (scores soft-capped
    to cap * tanh(score / cap) when soft_cap is set)."""
    group = NUM_HEADS // NUM_KV_HEADS
    outs = []
    for q, k, v in zip(queries, keys, values):
        q_len, s = q.shape[0], k.shape[0]
        for i in range(q_len):
            pos = s - q_len + i
            visible = [j for j in range(s) if j <= pos and (window == 0 or j > pos - window)]
            row = torch.empty(NUM_HEADS, HEAD_SIZE, dtype=torch.float64)
            for h in range(NUM_HEADS):
                kk, vv = k[visible, h // group].double(), v[visible, h // group].double()
                scores = kk @ q[i, h].double() * scale
                if alibi is not None:
                    scores = scores + float(alibi[h]) * (torch.tensor(visible, dtype=torch.float64) - pos)
                if soft_cap:
                    scores = soft_cap * torch.tanh(scores / soft_cap)
                p = torch.softmax(scores, dim=0)
                row[h] = p @ vv
            outs.append(row)
    return torch.stack(outs)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]
)
def test_paged_attention_mixed_batch(window, dtype, tol):
    queries, keys, values, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(BATCH, dtype)
    num_tokens = int(qsl[-1])
    pad = 3  # graph-bucket padding rows must come back zeroed
    query = torch.cat(queries + [torch.randn(pad, NUM_HEADS, HEAD_SIZE).to(dtype)])
    out = torch.full_like(query, float("nan"))
    scale = HEAD_SIZE**-0.5
    paged_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, qsl,
        scale, window, max(q for q, _ in BATCH), int(seq_lens.max()),
    )
    expected = _dense_reference(queries, keys, values, scale, window)
    torch.testing.assert_close(out[:num_tokens].double(), expected, rtol=tol, atol=tol)
    assert torch.count_nonzero(out[num_tokens:]) == 0


def test_sliding_window_changes_the_result():
    """Guards the test above against a window that silently does nothing."""
    queries, keys, values, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(BATCH, torch.float32)
    outs = []
    for window in (0, 3):
        out = torch.empty(int(qsl[-1]), NUM_HEADS, HEAD_SIZE)
        query = torch.cat(queries)
        paged_attention(out, query, key_cache, value_cache, block_table, seq_lens, qsl, 0.25, window, 9, 17)
        outs.append(out)
    # Decodes at seq_len 1 and 3 see all their keys through a window of 3; longer contexts lose some.
    torch.testing.assert_close(outs[0][:2], outs[1][:2])
    assert not torch.allclose(outs[0][2], outs[1][2])
    assert not torch.allclose(outs[0][-9:], outs[1][-9:])


def test_reshape_and_cache_scatters_and_skips_negative_slots():
    g = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 5, 7
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=g)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=g)
    key_cache = torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([19, 0, -1, 6, 7, -1, 12], dtype=torch.int64)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    expected_k, expected_v = torch.zeros_like(key_cache), torch.zeros_like(value_cache)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            expected_k[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = key[t]
            expected_v[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = value[t]
    torch.testing.assert_close(key_cache, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(value_cache, expected_v, rtol=0, atol=0)


def test_reshape_and_cache_into_strided_cache_view():
    """Caches allocated as one [2, ...] tensor and viewed per K/V (non-contiguous when split on a later dim)."""
    kv = torch.zeros(3, BLOCK_SIZE, 2, NUM_KV_HEADS, HEAD_SIZE)
    key_cache, value_cache = kv[:, :, 0], kv[:, :, 1]
    key = torch.randn(2, NUM_KV_HEADS, HEAD_SIZE)
    reshape_and_cache(key, -key, key_cache, value_cache, torch.tensor([5, 10]))
    torch.testing.assert_close(kv[1, 1, 0], key[0])
    torch.testing.assert_close(kv[2, 2, 1], -key[1])
    assert torch.count_nonzero(kv) == 2 * 2 * NUM_KV_HEADS * HEAD_SIZE


def test_opcheck():
    batch = BATCH[:4] + BATCH[7:8]
    queries, _, _, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(batch, torch.float32)
    query = torch.cat(queries)
    out = torch.empty_like(query)
    args = (out, query, key_cache, value_cache, block_table, seq_lens, qsl, 0.25, 0, 5, 17)
    torch.library.opcheck(torch.ops.graphserve.paged_attention.default, args)
    key = torch.randn(3, NUM_KV_HEADS, HEAD_SIZE)
    slots = torch.tensor([1, -1, 6])
    torch.library.opcheck(
        torch.ops.graphserve.reshape_and_cache.default, (key, key.clone(), key_cache, value_cache, slots)
    )


@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_logit_soft_cap(window):
    """Gemma 2's soft-capping: a small cap changes the result, and it matches the definition."""
    queries, keys, values, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(BATCH, torch.float32)
    query = torch.cat(queries)
    args = (query, key_cache, value_cache, block_table, seq_lens, qsl, 1.5, window, max(q for q, _ in BATCH),
            int(seq_lens.max()))
    capped, plain = torch.empty_like(query), torch.empty_like(query)
    paged_attention(capped, *args, None, None, 2.0)
    paged_attention(plain, *args)
    expected = _dense_reference(queries, keys, values, 1.5, window, soft_cap=2.0)
    torch.testing.assert_close(capped.double(), expected, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(capped, plain, atol=1e-3)


def test_paged_attention_alibi():
    """ALiBi biases slope_h * (key position - query position), one slope per query head."""
    queries, keys, values, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(BATCH, torch.float32)
    query = torch.cat(queries)
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(NUM_HEADS)])
    out = torch.empty_like(query)
    paged_attention(out, query, key_cache, value_cache, block_table, seq_lens, qsl, 0.5, 0,
                    max(q for q, _ in BATCH), int(seq_lens.max()), None, None, 0.0, slopes)
    expected = _dense_reference(queries, keys, values, 0.5, 0, alibi=slopes)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)

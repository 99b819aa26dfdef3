"""Attention layer (paged, chunked, multi-step decode vs plain), metadata builder, backend registry, compile."""
import random

import numpy as np
import pytest
import torch

from graphserve.attention.backends.base import AttentionMetadataBuilder
from graphserve.attention.backends.registry import get_attn_backend, select_attn_backend
from graphserve.attention.backends.torch_ref import TorchRefBackend
from graphserve.attention.forward_context import get_forward_context, set_forward_context
from graphserve.layers.attention import Attention

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 4, 2, 16, 4


def _qkv(num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, NUM_HEADS * HEAD_SIZE, generator=g),
        torch.randn(num_tokens, NUM_KV_HEADS * HEAD_SIZE, generator=g),
        torch.randn(num_tokens, NUM_KV_HEADS * HEAD_SIZE, generator=g),
    )


def _kv_cache(num_blocks):
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    return torch.zeros(shape), torch.zeros(shape)


def _run_schedule(layer, seqs, schedule, kv_caches, num_blocks):
    """Run `schedule` (per step: {seq index: num tokens}) through the paged path; per-sequence outputs."""
    physical = list(range(num_blocks))
    random.Random(0).shuffle(physical)
    block_ids = [[physical.pop() for _ in range(-(-s[0].shape[0] // BLOCK_SIZE))] for s in seqs]
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]
    builder = AttentionMetadataBuilder(BLOCK_SIZE)
    for step in schedule:
        ids = list(step)
        q, k, v = (torch.cat([seqs[i][j][done[i] : done[i] + step[i]] for i in ids]) for j in range(3))
        md = builder.build(
            query_lens=[step[i] for i in ids],
            seq_lens=[done[i] + step[i] for i in ids],
            block_tables=[block_ids[i][: -(-(done[i] + step[i]) // BLOCK_SIZE)] for i in ids],
        )
        with set_forward_context(md, kv_caches):
            out = layer(q, k, v)
        for i, chunk in zip(ids, out.split([step[i] for i in ids])):
            outs[i].append(chunk)
            done[i] += step[i]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_paged_chunked_prefill_and_decode_match_plain_attention(sliding_window):
    layer = Attention(NUM_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, NUM_KV_HEADS, layer_idx=1, sliding_window=sliding_window)
    seqs = [_qkv(13, seed=0), _qkv(7, seed=1)]
    # Sequence 0: chunked prefill then decodes; sequence 1 joins mid-way, so steps mix prefill and decode.
    schedule = [{0: 5}, {0: 4, 1: 3}, {0: 1, 1: 4}, {0: 1, 1: 0}, {1: 0, 0: 1}, {0: 1}]
    decoy = _kv_cache(12)
    kv_caches = [decoy, _kv_cache(12)]
    paged = _run_schedule(layer, seqs, schedule, kv_caches, num_blocks=12)
    for (q, k, v), out in zip(seqs, paged):
        torch.testing.assert_close(out, layer(q, k, v), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(decoy[0]) == 0  # layer_idx picks its own cache
    assert torch.count_nonzero(kv_caches[1][0]) == 20 * NUM_KV_HEADS * HEAD_SIZE


def test_plain_path_is_causal_gqa_attention():
    layer = Attention(NUM_HEADS, HEAD_SIZE, 0.3, NUM_KV_HEADS, layer_idx=0)
    q, k, v = _qkv(6, seed=3)
    out = layer(q, k, v).view(6, NUM_HEADS, HEAD_SIZE)
    group = NUM_HEADS // NUM_KV_HEADS
    for t in range(6):
        for h in range(NUM_HEADS):
            kk = k.view(6, NUM_KV_HEADS, HEAD_SIZE)[: t + 1, h // group]
            vv = v.view(6, NUM_KV_HEADS, HEAD_SIZE)[: t + 1, h // group]
            p = torch.softmax(kk @ q.view(6, NUM_HEADS, HEAD_SIZE)[t, h] * 0.3, dim=0)
            torch.testing.assert_close(out[t, h], p @ vv, rtol=1e-5, atol=1e-5)
    with set_forward_context(None, []):  # a profiling run: no metadata, same result
        torch.testing.assert_close(layer(q, k, v).view(6, NUM_HEADS, HEAD_SIZE), out)


def test_compiled_fullgraph_no_recompile_across_batches():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = Attention(NUM_HEADS, HEAD_SIZE, 0.25, NUM_KV_HEADS, layer_idx=0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: layer(q, k, v) * 2, backend=counter, fullgraph=True)
    builder = AttentionMetadataBuilder(BLOCK_SIZE)
    kv_caches = [_kv_cache(8)]
    q, k, v = _qkv(2, seed=4)
    for seq_lens, tables in (([3, 5], [[1], [2, 3]]), ([9, 1], [[4, 5, 6], [7]])):
        md = builder.build([1, 1], seq_lens, tables)
        with set_forward_context(md, kv_caches):
            got = compiled(q, k, v)
        with set_forward_context(md, kv_caches):
            expected = layer(q, k, v) * 2
        torch.testing.assert_close(got, expected)
    assert counter.frame_count == 1
    assert "graphserve.unified_attention" in counter.graphs[0].code


def test_unified_attention_opcheck():
    layer = Attention(NUM_HEADS, HEAD_SIZE, 0.25, NUM_KV_HEADS, layer_idx=0)
    q, k, v = _qkv(3, seed=5)
    args = (torch.empty_like(q), q, k, v, layer.layer_id)
    torch.library.opcheck(torch.ops.graphserve.unified_attention.default, args)
    md = AttentionMetadataBuilder(BLOCK_SIZE).build([2, 1], [2, 6], [[0], [1, 2]])
    with set_forward_context(md, [_kv_cache(4)]):
        torch.library.opcheck(torch.ops.graphserve.unified_attention.default, args)


def test_builder_derives_slot_mapping_like_the_runner():
    md = AttentionMetadataBuilder(BLOCK_SIZE).build(
        query_lens=[3, 1, 2], seq_lens=[3, 6, 9], block_tables=[[7], [2, 5], [4, 1, 3]]
    )
    # seq 0 positions 0-2 in block 7; seq 1 position 5 in block 5; seq 2 positions 7-8 in blocks 1 and 3.
    assert md.slot_mapping.tolist() == [28, 29, 30, 21, 7, 12]
    assert md.slot_mapping.dtype == torch.int64
    assert md.query_start_loc.tolist() == [0, 3, 4, 6] and md.query_start_loc.dtype == torch.int32
    assert md.seq_lens.tolist() == [3, 6, 9] and md.seq_lens.dtype == torch.int32
    assert md.block_table.tolist() == [[7, 0, 0], [2, 5, 0], [4, 1, 3]] and md.block_table.dtype == torch.int32
    assert (md.max_query_len, md.max_seq_len, md.num_actual_tokens, md.num_seqs) == (3, 9, 6, 3)


def test_builder_takes_numpy_buffers_copies_them_and_pads():
    query_lens, seq_lens = np.array([2, 1], dtype=np.int32), np.array([2, 5], dtype=np.int32)
    table = np.array([[3, 0], [1, 2]], dtype=np.int32)
    slots = np.array([12, 13, 8], dtype=np.int64)
    builder = AttentionMetadataBuilder(BLOCK_SIZE, max_num_blocks_per_seq=4)
    md = builder.build(query_lens, seq_lens, table, slots, device="cpu", num_tokens=5)
    slots[:] = 0  # the runner reuses its buffers next step
    table[:] = 0
    assert md.slot_mapping.tolist() == [12, 13, 8, -1, -1]
    assert md.block_table.tolist() == [[3, 0, 0, 0], [1, 2, 0, 0]]
    assert md.num_actual_tokens == 3 and md.query_start_loc.tolist() == [0, 2, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_lens=[3], seq_lens=[2], block_tables=[[0]]), "query_len <= seq_len"),
    (dict(query_lens=[1], seq_lens=[5], block_tables=[[0]]), "exceeds its block table"),
    (dict(query_lens=[1, 1], seq_lens=[1], block_tables=[[0]]), "number of sequences"),
    (dict(query_lens=[2], seq_lens=[2], block_tables=[[0]], slot_mapping=[0]), "slot_mapping has 1"),
    (dict(query_lens=[2], seq_lens=[2], block_tables=[[0]], num_tokens=1), "num_tokens=1"),
])
def test_builder_rejects_inconsistent_batches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMetadataBuilder(BLOCK_SIZE).build(**kwargs)


def test_backend_registry_and_capabilities():
    assert select_attn_backend("cpu") is TorchRefBackend
    assert select_attn_backend("cuda", backend="torch_ref") is TorchRefBackend
    assert get_attn_backend("TORCH_REF").get_metadata_builder_cls() is AttentionMetadataBuilder
    with pytest.raises(ValueError, match="supported: \\['TORCH_REF'\\]"):
        get_attn_backend("flash")
    with pytest.raises(ValueError, match="no attention backend for platform"):
        select_attn_backend("tpu")
    TorchRefBackend.validate(80, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        TorchRefBackend.validate(64, torch.int8)
    assert TorchRefBackend.get_kv_cache_shape(10, 16, 2, 64) == (10, 16, 2, 64)


def test_forward_context_nests_and_restores():
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    with set_forward_context(None, [1]):
        with set_forward_context(None, [2]):
            assert get_forward_context().kv_caches == [2]
        assert get_forward_context().kv_caches == [1]
    with pytest.raises(RuntimeError):
        get_forward_context()

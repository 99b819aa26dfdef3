"""The attention layer: the plain (profiling) path, one opaque op under torch.compile, opcheck, forward context."""
import pytest
import torch

from graphserve.attention.backends.paged import PagedAttentionBackend
from graphserve.attention.forward_context import get_forward_context, set_forward_context
from graphserve.layers.attention import Attention
from tests.attention.attention_testutils import (
    BLOCK_SIZE,
    HEAD_SIZE,
    NUM_HEADS,
    NUM_KV_HEADS,
    attention_inputs,
    random_qkv,
)

_qkv = random_qkv


def _kv_cache(num_blocks):
    return torch.zeros(PagedAttentionBackend.get_kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE))


def _metadata(query_lens, seq_lens, block_tables):
    builder = PagedAttentionBackend.get_builder_cls()(BLOCK_SIZE, 8, 64, 64, torch.device("cpu"), False)
    return builder.build(attention_inputs(query_lens, seq_lens, block_tables, BLOCK_SIZE))


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
    kv_caches = [_kv_cache(8)]
    q, k, v = _qkv(2, seed=4)
    for seq_lens, tables in (([3, 5], [[1], [2, 3]]), ([9, 1], [[4, 5, 6], [7]])):
        md = _metadata([1, 1], seq_lens, tables)
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
    md = _metadata([2, 1], [2, 6], [[0], [1, 2]])
    with set_forward_context(md, [_kv_cache(4)]):
        torch.library.opcheck(torch.ops.graphserve.unified_attention.default, args)


def test_forward_context_nests_and_restores():
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    with set_forward_context(None, [1]):
        with set_forward_context(None, [2]):
            assert get_forward_context().kv_caches == [2]
        assert get_forward_context().kv_caches == [1]
    with pytest.raises(RuntimeError):
        get_forward_context()

"""Triton attention kernels (decode, prefill/mixed, reshape_and_cache) against the torch references.

CI runs them in the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py) on CPU tensors, calling the
kernel wrappers directly: through the op dispatcher, CPU tensors would run the torch reference.
Shapes stay at a few tiles: the interpreter costs milliseconds per program instance and per tl.dot.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from graphserve.ops.attention import _paged_attention_ref, _reshape_and_cache_ref  # noqa: E402
from graphserve.ops.triton import paged_attention as triton_attention  # noqa: E402
from graphserve.ops.triton.paged_attention import paged_decode_attention  # noqa: E402
from graphserve.ops.triton.prefill_attention import paged_prefill_attention  # noqa: E402
from graphserve.ops.triton.reshape_and_cache import reshape_and_cache  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Decode contexts: 1, block_size - 1, block_size, block_size + 1, a few tiles.
DECODE_SEQ_LENS = [1, 15, 16, 17, 50, 33]
# (query_len, seq_len): a whole prompt, chunks over cached prefixes, decode rows, a chunk ending mid-block.
MIXED = [(9, 9), (5, 21), (1, 17), (3, 33), (1, 1), (12, 40)]


def _paged_batch(batch, num_heads, num_kv_heads, head_dim, block_size, dtype, num_pad_rows=2, seed=0):
    """Random paged cache (garbage in unowned blocks), shuffled block tables, queries with trailing pad rows."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for _, s in batch]
    num_blocks = sum(blocks_per_seq) + 3
    physical = list(range(num_blocks))
    random.Random(seed).shuffle(physical)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=g).to(dtype)
    value_cache = torch.randn(cache_shape, generator=g).to(dtype)
    # Padding entries point far outside the cache: reading one would fail or show in the result.
    block_table = torch.full((len(batch), max(blocks_per_seq, default=0) + 2), 10**6, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = torch.tensor([physical.pop() for _ in range(n)], dtype=torch.int32)
    q_lens = [q for q, _ in batch]
    num_tokens = sum(q_lens) + num_pad_rows
    query = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in batch], dtype=torch.int32)
    return query, key_cache, value_cache, block_table, seq_lens, query_start_loc


def _reference(query, key_cache, value_cache, block_table, seq_lens, qsl, scale, window, soft_cap=0.0,
               alibi=None):
    out = torch.full_like(query, float("nan"))
    _paged_attention_ref(out, query, key_cache, value_cache, block_table, seq_lens, qsl, scale, window, 0, 0,
                         None, None, soft_cap, alibi)
    return out


def _assert_close(out, expected, dtype):
    assert not torch.isnan(out).any(), "a row was left unwritten"
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(dtype, num_heads, num_kv_heads, num_splits):
    batch = [(1, s) for s in DECODE_SEQ_LENS]
    args = _paged_batch(batch, num_heads, num_kv_heads, 32, 16, dtype)
    query = args[0]
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, *args, 0.3, 0, max(DECODE_SEQ_LENS), num_splits=num_splits, block_n=16)
    _assert_close(out, _reference(*args, 0.3, 0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,num_splits", [(7, 1), (7, 4), (20, 2)])
def test_decode_sliding_window(dtype, window, num_splits):
    batch = [(1, s) for s in DECODE_SEQ_LENS]
    args = _paged_batch(batch, 8, 2, 32, 16, dtype, seed=1)
    out = torch.full_like(args[0], float("nan"))
    paged_decode_attention(out, *args, 0.3, window, 50, num_splits=num_splits, block_n=16)
    expected = _reference(*args, 0.3, window)
    _assert_close(out, expected, dtype)
    # Guard against a window that does nothing: the long contexts must differ from full attention.
    assert not torch.allclose(expected[4], _reference(*args, 0.3, 0)[4], atol=1e-3)


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (24, 16)])
def test_decode_head_dims_and_block_sizes(head_dim, block_size):
    batch = [(1, s) for s in (1, block_size - 1, block_size + 1, 3 * block_size)]
    args = _paged_batch(batch, 4, 1, head_dim, block_size, torch.float32, seed=2)
    out = torch.full_like(args[0], float("nan"))
    paged_decode_attention(out, *args, head_dim**-0.5, 0, 3 * block_size, num_splits=2)
    _assert_close(out, _reference(*args, head_dim**-0.5, 0), torch.float32)


def test_decode_static_max_seq_len_as_under_graphs():
    """A static upper bound (max_model_len) changes the split count, not the result."""
    args = _paged_batch([(1, 45)], 8, 1, 32, 16, torch.float32, seed=3)
    device = args[0].device
    exact = triton_attention.default_num_splits(1, 1, 45, device)
    static = triton_attention.default_num_splits(1, 1, 8192, device)
    assert static > exact, "the test must exercise two different split counts"
    outs = []
    for max_seq_len in (45, 8192):
        out = torch.full_like(args[0], float("nan"))
        paged_decode_attention(out, *args, 0.3, 0, max_seq_len, block_n=16)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    _assert_close(outs[1], _reference(*args, 0.3, 0), torch.float32)


def test_decode_padded_rows_and_sequences_are_zeroed():
    """Graph padding: a sequence with no token this step, and token rows that no sequence owns."""
    batch = [(1, 20), (0, 7), (1, 3)]
    query, key_cache, value_cache, block_table, seq_lens, qsl = _paged_batch(
        batch, 4, 2, 32, 16, torch.float32, num_pad_rows=3, seed=4
    )
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, query, key_cache, value_cache, block_table, seq_lens, qsl, 0.3, 0, 20,
                           num_splits=2, block_n=16)
    expected = _reference(query, key_cache, value_cache, block_table, seq_lens, qsl, 0.3, 0)
    _assert_close(out, expected, torch.float32)
    assert torch.count_nonzero(out[2:]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [0, 6])
def test_prefill_mixed_batch_matches_reference(dtype, num_heads, num_kv_heads, window):
    args = _paged_batch(MIXED, num_heads, num_kv_heads, 32, 16, dtype, num_pad_rows=3, seed=5)
    out = torch.full_like(args[0], float("nan"))
    paged_prefill_attention(out, *args, 0.3, window, max(q for q, _ in MIXED))
    expected = _reference(*args, 0.3, window)
    _assert_close(out, expected, dtype)
    assert torch.count_nonzero(out[-3:]) == 0


@pytest.mark.parametrize("block_m,block_n", [(32, 32), (64, 16)])
def test_prefill_tile_shapes(block_m, block_n):
    """Other tiles move the unmasked/masked loop boundary and the number of query blocks per sequence."""
    args = _paged_batch(MIXED, 8, 2, 64, 16, torch.float32, seed=6)
    out = torch.full_like(args[0], float("nan"))
    paged_prefill_attention(out, *args, 0.125, 0, 12, block_m=block_m, block_n=block_n)
    _assert_close(out, _reference(*args, 0.125, 0), torch.float32)


def test_op_impl_dispatches_decode_and_mixed_batches():
    """The registered impl: pure decode batches take the decode kernel, others the prefill kernel; both agree."""
    decode = _paged_batch([(1, s) for s in (5, 30)], 8, 2, 32, 16, torch.float32, seed=7)
    via_op, via_prefill = torch.full_like(decode[0], float("nan")), torch.full_like(decode[0], float("nan"))
    triton_attention.paged_attention(via_op, *decode, 0.3, 0, 1, 30)
    paged_prefill_attention(via_prefill, *decode, 0.3, 0, 1)
    torch.testing.assert_close(via_op, via_prefill, rtol=1e-5, atol=1e-5)
    mixed = _paged_batch(MIXED[:3], 8, 2, 32, 16, torch.float32, seed=8)
    out = torch.full_like(mixed[0], float("nan"))
    triton_attention.paged_attention(out, *mixed, 0.3, 0, 9, 21)
    _assert_close(out, _reference(*mixed, 0.3, 0), torch.float32)


def test_bf16_is_computed_in_fp32_under_the_interpreter():
    args = _paged_batch(MIXED[:4], 8, 2, 32, 16, torch.bfloat16, seed=9)
    out = torch.full_like(args[0], float("nan"))
    paged_prefill_attention(out, *args, 0.3, 0, 9)
    _assert_close(out, _reference(*args, 0.3, 0), torch.bfloat16)


@pytest.mark.parametrize("num_kv_heads,head_dim,cache_dtype", [(2, 32, torch.float32), (3, 24, torch.float16)])
def test_reshape_and_cache_matches_reference(num_kv_heads, head_dim, cache_dtype):
    g = torch.Generator().manual_seed(10)
    key = torch.randn(7, num_kv_heads, head_dim, generator=g)
    value = torch.randn(7, num_kv_heads, head_dim, generator=g)
    slots = torch.tensor([19, 0, -1, 6, 33, -1, 12], dtype=torch.int64)
    # One [num_blocks, block_size, 2, ...] buffer viewed as K and V: strided caches, as runners allocate them.
    kv = torch.randn(5, 8, 2, num_kv_heads, head_dim, generator=g).to(cache_dtype)
    expected = kv.clone()
    reshape_and_cache(key, value, kv[:, :, 0], kv[:, :, 1], slots)
    _reshape_and_cache_ref(key, value, expected[:, :, 0], expected[:, :, 1], slots)
    torch.testing.assert_close(kv, expected, rtol=0, atol=0)
    assert torch.equal(kv[0, 0, 0], key[1].to(cache_dtype)) and torch.equal(kv[4, 1, 1], value[4].to(cache_dtype))


def test_registration_is_explicit_idempotent_and_on_the_device_key():
    """Importing registers nothing; register_triton_kernels attaches the impls to the CUDA key, once.

    Runs in a fresh interpreter so this process's dispatcher keeps no CUDA kernels other tests could see.
    """
    code = (
        "import graphserve.ops\n"
        "import graphserve.ops.triton.paged_attention as pa, graphserve.ops.triton.reshape_and_cache as rc\n"
        "from graphserve.ops._register import get_op\n"
        "from graphserve.ops.triton import register_triton_kernels\n"
        "assert set(get_op('paged_attention').kernels) == {'CompositeExplicitAutograd'}\n"
        "assert set(get_op('reshape_and_cache').kernels) == {'CompositeExplicitAutograd'}\n"
        "registered = register_triton_kernels('CUDA')\n"
        "assert registered['paged_attention'] == registered['reshape_and_cache'] == 'triton', registered\n"
        "assert get_op('paged_attention').kernels['CUDA'] is pa.paged_attention\n"
        "assert get_op('reshape_and_cache').kernels['CUDA'] is rc.reshape_and_cache\n"
        "assert register_triton_kernels('CUDA') == registered\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"})


@pytest.mark.parametrize("window", [0, 6])
def test_logit_soft_cap_matches_reference(window):
    """Gemma 2's soft-cap in both kernels (a cap small enough to change every score), split decode included."""
    decode = _paged_batch([(1, s) for s in DECODE_SEQ_LENS], 8, 2, 32, 16, torch.float32, seed=9)
    out = torch.full_like(decode[0], float("nan"))
    paged_decode_attention(out, *decode, 1.2, window, max(DECODE_SEQ_LENS), None, None, 3.0, num_splits=3)
    _assert_close(out, _reference(*decode, 1.2, window, 3.0), torch.float32)
    mixed = _paged_batch(MIXED, 8, 2, 32, 16, torch.float32, num_pad_rows=3, seed=10)
    out = torch.full_like(mixed[0], float("nan"))
    paged_prefill_attention(out, *mixed, 1.2, window, max(q for q, _ in MIXED), None, None, 3.0)
    _assert_close(out, _reference(*mixed, 1.2, window, 3.0), torch.float32)
    assert not torch.allclose(out, _reference(*mixed, 1.2, window), atol=1e-3)


@pytest.mark.parametrize("window", [0, 6])
def test_alibi_matches_reference(window):
    """ALiBi slopes per query head (grouped heads included) in both kernels, split decode included."""
    slopes = torch.tensor([2.0 ** -(0.5 * (i + 1)) for i in range(8)])
    decode = _paged_batch([(1, s) for s in DECODE_SEQ_LENS], 8, 2, 32, 16, torch.float32, seed=11)
    out = torch.full_like(decode[0], float("nan"))
    paged_decode_attention(out, *decode, 0.3, window, max(DECODE_SEQ_LENS), None, None, 0.0, slopes, num_splits=3)
    _assert_close(out, _reference(*decode, 0.3, window, 0.0, slopes), torch.float32)
    mixed = _paged_batch(MIXED, 8, 2, 32, 16, torch.float32, num_pad_rows=3, seed=12)
    out = torch.full_like(mixed[0], float("nan"))
    paged_prefill_attention(out, *mixed, 0.3, window, max(q for q, _ in MIXED), None, None, 0.0, slopes)
    _assert_close(out, _reference(*mixed, 0.3, window, 0.0, slopes), torch.float32)
    assert not torch.allclose(out, _reference(*mixed, 0.3, window), atol=1e-3)

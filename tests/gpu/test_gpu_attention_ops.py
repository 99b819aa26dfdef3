"""`torch.ops.graphserve.reshape_and_cache` / `paged_attention` on CUDA tensors (the Triton kernels) against the torch
reference, at real shapes.

The reference (`get_op(name).reference`) computes in fp32 and keeps fp32 outputs; the kernels must stay within
||out - ref|| / ||ref|| < 1e-2 in bf16 and < 1e-4 in fp32 on the real rows, write exact zeros in the padding rows
and leave no NaN. Caches hand blocks out in shuffled order, and table entries past a sequence's blocks point at
a spare block of large garbage, so a read past a context shows in the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from gpu_testutils import rel_err

import graphserve.ops  # noqa: F401  (defines the ops)
from graphserve.ops._register import get_op

BLOCK_SIZE = 16
# (num_heads, num_kv_heads, head_dim)
SHAPES = {"hd128-gqa4": (32, 8, 128), "hd128-gqa8": (64, 8, 128), "hd64-gqa4": (16, 4, 64), "hd64-gqa8": (32, 4, 64)}
LLAMA3_8B = SHAPES["hd128-gqa4"]
# bf16 at every shape; fp32 at one shape per head_dim (covering both GQA ratios too).
CASES = [pytest.param(s, torch.bfloat16, id=f"{s}-bf16") for s in SHAPES] + [
    pytest.param(s, torch.float32, id=f"{s}-fp32") for s in ("hd128-gqa4", "hd64-gqa8")]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
# Contexts of one token, around a block, and up to 8k.
DECODE_SEQ_LENS = [1, 15, 16, 17, 100, 511, 1000, 2047, 2048, 3000, 4097, 5000, 6000, 7000, 8000, 8192]
# (query_len, seq_len): whole prompts, chunks after cached prefixes, decode rows among them.
MIXED = [(1024, 1024), (512, 4096), (1, 8192), (1, 17), (300, 2300), (77, 77), (1, 5000), (2000, 8000)]


@dataclass
class PagedBatch:
    """The tensor arguments of paged_attention after `out`, and the batch's sizes."""

    query: torch.Tensor  # [num_tokens + pad rows, num_heads, head_dim]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [num_seqs, width] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int

    def args(self) -> tuple:
        return (self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens, self.query_start_loc)


def paged_batch(q_lens, seq_lens, shape, dtype, *, num_pad_rows=0, table_width=None, seed=0) -> PagedBatch:
    """A random paged batch on the GPU; the last block is owned by no sequence and holds garbage x 100."""
    num_heads, num_kv_heads, head_dim = shape
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_owned = sum(blocks_per_seq)
    spare = num_owned
    order = torch.randperm(num_owned, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = torch.full((len(seq_lens), table_width or max(blocks_per_seq)), spare, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = order[start:start + n]
        start += n
    g = torch.Generator(device="cuda").manual_seed(seed)
    cache_shape = (num_owned + 1, BLOCK_SIZE, num_kv_heads, head_dim)
    caches = [torch.randn(cache_shape, generator=g, device="cuda") for _ in range(2)]
    for cache in caches:
        cache[spare] *= 100.0
    num_tokens = sum(q_lens) + num_pad_rows
    qsl = [0] + torch.tensor(list(q_lens)).cumsum(0).tolist()
    return PagedBatch(
        query=torch.randn(num_tokens, num_heads, head_dim, generator=g, device="cuda").to(dtype),
        key_cache=caches[0].to(dtype), value_cache=caches[1].to(dtype), block_table=table.cuda(),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )


def reference(batch: PagedBatch, scale: float, window: int) -> torch.Tensor:
    """The torch reference op, computed and kept in fp32 (padding rows zeroed)."""
    out = torch.empty(batch.query.shape, dtype=torch.float32, device="cuda")
    get_op("paged_attention").reference(out, *batch.args(), scale, window, 0, 0)
    return out


def run_op(batch: PagedBatch, scale: float, window: int, max_query_len=None, max_seq_len=None) -> torch.Tensor:
    """torch.ops.graphserve.paged_attention into a NaN-filled output, so unwritten rows show."""
    out = torch.full_like(batch.query, float("nan"))
    torch.ops.graphserve.paged_attention(out, *batch.args(), scale, window, max_query_len or batch.max_query_len,
                                         max_seq_len or batch.max_seq_len)
    return out


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, num_real_rows: int, dtype) -> None:
    assert not torch.isnan(out).any(), "a row was left unwritten (NaN)"
    err = rel_err(out[:num_real_rows], ref[:num_real_rows])
    assert err < TOL[dtype], f"||out - ref|| / ||ref|| = {err:.2e} >= {TOL[dtype]}"
    assert bool((out[num_real_rows:] == 0).all()), "padding rows are not zero"


@pytest.fixture(autouse=True, scope="module")
def _kernels(cuda_kernels):
    """The Triton kernels on the CUDA key, so the op calls below run them and not the reference."""
    for name in ("reshape_and_cache", "paged_attention"):
        assert "CUDA" in get_op(name).kernels, f"no CUDA kernel registered for graphserve::{name}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_matches_reference(dtype):
    """4 096 tokens (Llama-3-8B KV heads) written into shuffled slots, every tenth slot -1 (skipped): the caches
    are bit-identical to the reference's, starting from the same contents."""
    g = torch.Generator(device="cuda").manual_seed(0)
    key = torch.randn(4096, 8, 128, generator=g, device="cuda").to(dtype)
    value = torch.randn(4096, 8, 128, generator=g, device="cuda").to(dtype)
    slots = torch.randperm(300 * BLOCK_SIZE, generator=g, device="cuda")[:4096]
    slots[::10] = -1
    caches = [torch.randn(300, BLOCK_SIZE, 8, 128, generator=g, device="cuda").to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    torch.ops.graphserve.reshape_and_cache(key, value, caches[0], caches[1], slots)
    get_op("reshape_and_cache").reference(key, value, ref_caches[0], ref_caches[1], slots)
    torch.cuda.synchronize()
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    written = slots[slots >= 0]
    assert torch.equal(caches[0].flatten(0, 1)[written], key[slots >= 0])  # the write happened at all


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_decode_matches_reference(shape, dtype):
    """16 decode sequences with contexts of 1 to 8 192 tokens and 3 padding rows, through the op with the
    engine's static max_seq_len (8 192): the default split-KV heuristic cuts these contexts into partitions."""
    batch = paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, SHAPES[shape], dtype, num_pad_rows=3, seed=1)
    scale = SHAPES[shape][2] ** -0.5
    out = run_op(batch, scale, 0, max_query_len=1, max_seq_len=8192)
    assert_close_to_reference(out, reference(batch, scale, 0), len(DECODE_SEQ_LENS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_seqs", "max_context"), [(1, 8192), (3, 8000), (256, 2048)],
                         ids=["1x8k-most-splits", "3x8k", "256x2k-no-split"])
def test_decode_split_kv_extremes_match_reference(dtype, num_seqs, max_context):
    """Decode batches at the ends of the split heuristic (Llama-3-8B attention): one long context split into many
    partitions, a few long ones, and 256 sequences that fill the GPU without splitting."""
    lens = torch.randint(1, max_context + 1, (num_seqs,), generator=torch.Generator().manual_seed(num_seqs)).tolist()
    lens[0] = max_context
    batch = paged_batch([1] * num_seqs, lens, LLAMA3_8B, dtype, num_pad_rows=1, seed=2)
    scale = LLAMA3_8B[2] ** -0.5
    out = run_op(batch, scale, 0, max_query_len=1)
    assert_close_to_reference(out, reference(batch, scale, 0), num_seqs, dtype)


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_mixed_prefill_decode_matches_reference(shape, dtype):
    """A mixed batch (whole prompts, chunks after cached prefixes up to 8k, decode rows) with 5 graph-padding rows
    matches the reference on the real rows and zeroes the padding."""
    batch = paged_batch([q for q, _ in MIXED], [s for _, s in MIXED], SHAPES[shape], dtype, num_pad_rows=5, seed=2)
    scale = SHAPES[shape][2] ** -0.5
    out = run_op(batch, scale, 0, max_seq_len=8192)
    assert_close_to_reference(out, reference(batch, scale, 0), sum(q for q, _ in MIXED), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window_matches_reference(dtype):
    """A sliding window of 1 000 tokens (Llama-3-8B attention): the decode batch and the mixed batch above match
    the windowed reference."""
    scale = LLAMA3_8B[2] ** -0.5
    dec = paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, LLAMA3_8B, dtype, num_pad_rows=3, seed=4)
    assert_close_to_reference(run_op(dec, scale, 1000, max_query_len=1, max_seq_len=8192),
                              reference(dec, scale, 1000), len(DECODE_SEQ_LENS), dtype)
    mixed = paged_batch([q for q, _ in MIXED], [s for _, s in MIXED], LLAMA3_8B, dtype, num_pad_rows=5, seed=5)
    assert_close_to_reference(run_op(mixed, scale, 1000), reference(mixed, scale, 1000), sum(q for q, _ in MIXED),
                              dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_graph_replay_with_new_metadata(dtype):
    """The cache write and the decode op captured once in a CUDA graph (bucket 16, static max_seq_len 8 192), then
    replayed on new queries, block tables, context lengths, caches and slots (half of them -1), one trial with a
    padded sequence that has no token: each replay matches the reference on the caches the replay wrote."""
    shape = LLAMA3_8B
    scale = shape[2] ** -0.5
    static = paged_batch([1] * 16, [8192] * 16, shape, dtype, table_width=512, seed=3)
    g = torch.Generator(device="cuda").manual_seed(6)
    key = torch.randn(16, shape[1], shape[2], generator=g, device="cuda").to(dtype)
    slots = torch.full((16,), -1, dtype=torch.int64, device="cuda")
    out = torch.empty_like(static.query)

    def step() -> None:
        torch.ops.graphserve.reshape_and_cache(key, key, static.key_cache, static.value_cache, slots)
        torch.ops.graphserve.paged_attention(out, *static.args(), scale, 0, 1, 8192)

    step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    trials = [[5, 16, 17, 2000, 8192, 1, 300, 4097] * 2, [700] * 12 + [1, 2, 3, 0]]
    for trial, seq_lens in enumerate(trials):
        fresh = paged_batch([1] * 16, [max(s, 1) for s in seq_lens], shape, dtype, table_width=512, seed=10 + trial)
        fresh.seq_lens[15] = seq_lens[15]
        qsl = torch.arange(17, dtype=torch.int32, device="cuda")
        if seq_lens[15] == 0:
            qsl[16] = 15  # a padded sequence: no token this step, so its row is padding and must come back zero
        fresh.query_start_loc = qsl
        for name in ("query", "block_table", "seq_lens", "query_start_loc"):
            getattr(static, name).copy_(getattr(fresh, name))
        static.key_cache[: fresh.key_cache.shape[0]].copy_(fresh.key_cache)
        static.value_cache[: fresh.value_cache.shape[0]].copy_(fresh.value_cache)
        key.normal_(generator=g)
        slots.copy_(torch.arange(16, device="cuda") * BLOCK_SIZE + BLOCK_SIZE - 1)  # written inside the graph too
        slots[::2] = -1
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(out, reference(static, scale, 0), int(qsl[-1]), dtype)

"""Attention backends: each one against plain attention, the two against each other, their builders and registry."""
import random

import numpy as np
import pytest
import torch

from graphserve.attention.backends.base import PAD_SLOT_ID, AttentionInputs
from graphserve.attention.backends.paged import PagedAttentionBackend
from graphserve.attention.backends.registry import backend_names, get_attn_backend, select_attn_backend
from graphserve.attention.backends.sdpa import TorchSDPABackend
from graphserve.attention.forward_context import set_forward_context
from graphserve.layers.attention import Attention, bind_attention_backend
from graphserve.platforms.cpu import CpuPlatform
from graphserve.platforms.kernels import KernelChoice
from tests.attention.attention_testutils import (
    BLOCK_SIZE,
    HEAD_SIZE,
    NUM_HEADS,
    NUM_KV_HEADS,
    attention_inputs,
    random_qkv,
)

BACKENDS = [PagedAttentionBackend, TorchSDPABackend]
_qkv = random_qkv


def _builder(backend, max_num_reqs=8, max_num_tokens=256, max_model_len=64):
    return backend.get_builder_cls()(BLOCK_SIZE, max_num_reqs, max_num_tokens, max_model_len,
                                     torch.device("cpu"), pin_memory=False)


def _kv_cache(backend, num_blocks):
    return torch.zeros(backend.get_kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE))


def _layer(backend, layer_idx, sliding_window=None, scale=HEAD_SIZE**-0.5):
    layer = Attention(NUM_HEADS, HEAD_SIZE, scale, NUM_KV_HEADS, layer_idx=layer_idx, sliding_window=sliding_window)
    layer.set_backend(backend)
    return layer


def _run_schedule(layer, backend, seqs, schedule, kv_caches, num_blocks):
    """Run `schedule` (per step: {seq index: num tokens}) through the paged path; per-sequence outputs."""
    physical = list(range(num_blocks))
    random.Random(0).shuffle(physical)
    block_ids = [[physical.pop() for _ in range(-(-s[0].shape[0] // BLOCK_SIZE))] for s in seqs]
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]
    builder = _builder(backend)
    for step in schedule:
        ids = list(step)
        q, k, v = (torch.cat([seqs[i][j][done[i] : done[i] + step[i]] for i in ids]) for j in range(3))
        md = builder.build(attention_inputs(
            query_lens=[step[i] for i in ids],
            seq_lens=[done[i] + step[i] for i in ids],
            block_tables=[block_ids[i][: -(-(done[i] + step[i]) // BLOCK_SIZE)] for i in ids],
            block_size=BLOCK_SIZE,
        ))
        with set_forward_context(md, kv_caches):
            out = layer(q, k, v)
        for i, chunk in zip(ids, out.split([step[i] for i in ids])):
            outs[i].append(chunk)
            done[i] += step[i]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_paged_chunked_prefill_and_decode_match_plain_attention(backend, sliding_window):
    layer = _layer(backend, layer_idx=1, sliding_window=sliding_window)
    seqs = [_qkv(13, seed=0), _qkv(7, seed=1)]
    # Sequence 0: chunked prefill then decodes; sequence 1 joins mid-way, so steps mix prefill and decode.
    schedule = [{0: 5}, {0: 4, 1: 3}, {0: 1, 1: 4}, {0: 1, 1: 0}, {1: 0, 0: 1}, {0: 1}]
    decoy = _kv_cache(backend, 12)
    kv_caches = [decoy, _kv_cache(backend, 12)]
    paged = _run_schedule(layer, backend, seqs, schedule, kv_caches, num_blocks=12)
    for (q, k, v), out in zip(seqs, paged):
        torch.testing.assert_close(out, layer(q, k, v), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(decoy) == 0  # layer_idx picks its own cache
    assert torch.count_nonzero(kv_caches[1][0]) == 20 * NUM_KV_HEADS * HEAD_SIZE


def test_the_two_backends_agree_on_random_mixed_batches():
    """Same K/V written, same outputs: SDPA over an HND cache equals the paged reference over an NHD one."""
    rng = random.Random(7)
    for trial in range(4):
        num_seqs = rng.randint(1, 6)
        seq_lens = [rng.randint(1, 40) for _ in range(num_seqs)]
        query_lens = [rng.choice([1, 1, s]) if s > 1 else 1 for s in seq_lens]
        query_lens = [min(q, s) for q, s in zip(query_lens, seq_lens)]
        blocks = list(range(80))
        rng.shuffle(blocks)
        tables = [[blocks.pop() for _ in range(-(-s // BLOCK_SIZE))] for s in seq_lens]
        # The context before this step's tokens is written first (one earlier "prefill" step per sequence).
        history = [s - q for s, q in zip(seq_lens, query_lens)]
        num_tokens = sum(query_lens)
        q, k, v = _qkv(num_tokens, seed=trial)
        window = rng.choice([None, 5])
        outs = []
        for backend in BACKENDS:
            layer = _layer(backend, layer_idx=0, sliding_window=window)
            cache = [_kv_cache(backend, 80)]
            builder = _builder(backend)
            past = [i for i, h in enumerate(history) if h > 0]
            if past:
                _, pk, pv = _qkv(sum(history[i] for i in past), seed=100 + trial)
                pq = torch.zeros(pk.shape[0], NUM_HEADS * HEAD_SIZE)
                md = builder.build(attention_inputs([history[i] for i in past], [history[i] for i in past],
                                                    [tables[i] for i in past], BLOCK_SIZE))
                with set_forward_context(md, cache):
                    layer(pq, pk, pv)
            md = builder.build(attention_inputs(query_lens, seq_lens, tables, BLOCK_SIZE))
            with set_forward_context(md, cache):
                outs.append(layer(q, k, v))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_builder_copies_its_inputs():
    inputs = attention_inputs([2, 1], [2, 5], [[3], [1, 2]], BLOCK_SIZE)
    md = _builder(PagedAttentionBackend).build(inputs)
    expected_slots = inputs.slot_mapping.tolist()
    inputs.slot_mapping[:] = 0  # InputBatch reuses nothing, but a caller's arrays are its own
    inputs.block_table[:] = 0
    assert md.slot_mapping.tolist() == expected_slots == [12, 13, 8]
    assert md.block_table.tolist() == [[3, 0], [1, 2]] and md.block_table.dtype == torch.int32
    assert md.query_start_loc.tolist() == [0, 2, 3] and md.query_start_loc.dtype == torch.int32
    assert md.seq_lens.tolist() == [2, 5] and md.slot_mapping.dtype == torch.int64
    assert (md.max_query_len, md.max_seq_len, md.num_actual_tokens, md.num_seqs) == (2, 5, 3, 2)


def test_capture_metadata_is_padding_and_replay_writes_the_batch_into_it():
    builder = _builder(PagedAttentionBackend, max_model_len=16)  # 4 blocks per sequence
    md = builder.build_for_capture(4)
    assert md.slot_mapping.tolist() == [PAD_SLOT_ID] * 4 and md.seq_lens.tolist() == [1] * 4
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert (md.max_query_len, md.max_seq_len, md.num_actual_tokens) == (1, 16, 4)
    assert md.block_table.shape == (4, 4) and not md.block_table.any()
    # A wide batch first, then a narrower one: nothing of the first may survive in the captured views.
    builder.prepare_for_replay(attention_inputs([1] * 4, [13] * 4, [[9, 9, 9, 9]] * 4, BLOCK_SIZE), 4)
    builder.prepare_for_replay(attention_inputs([1, 1, 1], [3, 6, 1], [[2], [3, 4], [5]], BLOCK_SIZE), 4)
    assert md.slot_mapping.tolist() == [10, 17, 20, PAD_SLOT_ID]
    assert md.seq_lens.tolist() == [3, 6, 1, 1]
    assert md.block_table.tolist() == [[2, 0, 0, 0], [3, 4, 0, 0], [5, 0, 0, 0], [0, 0, 0, 0]]


def test_verify_capture_metadata_has_uniform_queries_and_padded_requests():
    builder = _builder(PagedAttentionBackend, max_model_len=16)
    md = builder.build_for_capture(2, 3)  # two requests of three query tokens (two drafts each)
    assert md.slot_mapping.tolist() == [PAD_SLOT_ID] * 6 and md.seq_lens.tolist() == [3, 3]
    assert md.query_start_loc.tolist() == [0, 3, 6]
    assert (md.max_query_len, md.max_seq_len, md.num_actual_tokens) == (3, 16, 6)
    # One real request of three tokens at positions 4..6: the second one is padding (no write, 3 keys of block 0).
    builder.prepare_for_replay(attention_inputs([3], [7], [[2, 5]], BLOCK_SIZE), 2, 3)
    assert md.slot_mapping.tolist() == [20, 21, 22] + [PAD_SLOT_ID] * 3  # block 5 (block size 4)
    assert md.seq_lens.tolist() == [7, 3]
    assert md.block_table.tolist() == [[2, 5, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="3 tokens per request"):
        builder.prepare_for_replay(attention_inputs([2], [7], [[2, 5]], BLOCK_SIZE), 2, 3)


def test_sdpa_has_no_graphs_and_paged_has_them_where_its_ops_do():
    assert TorchSDPABackend.graph_blockers({}) == ["the TORCH_SDPA attention backend"]
    with pytest.raises(NotImplementedError):
        _builder(TorchSDPABackend).build_for_capture(2)
    safe = {op: KernelChoice("triton", True) for op in PagedAttentionBackend.ops}
    assert PagedAttentionBackend.graph_blockers(safe) == []
    cpu = CpuPlatform().kernel_choices()
    assert PagedAttentionBackend.graph_blockers(cpu) == ["reshape_and_cache (torch)", "paged_attention (torch)"]


def test_backend_registry_and_capabilities():
    assert backend_names() == ["PAGED_ATTN", "TORCH_SDPA"]
    assert select_attn_backend(CpuPlatform()) is PagedAttentionBackend
    assert select_attn_backend(CpuPlatform(), "torch_sdpa") is TorchSDPABackend
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; choose one of \['PAGED_ATTN', "):
        get_attn_backend("flash")
    PagedAttentionBackend.validate(80, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        TorchSDPABackend.validate(64, torch.int8)
    assert PagedAttentionBackend.get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)
    assert TorchSDPABackend.get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 2, 16, 64)


def test_bind_sets_every_layer():
    model = torch.nn.ModuleList(
        [Attention(NUM_HEADS, HEAD_SIZE, 1.0, NUM_KV_HEADS, layer_idx=i) for i in range(3)])
    assert {type(m.impl).__name__ for m in model} == {"PagedAttentionImpl"}
    assert bind_attention_backend(model, TorchSDPABackend) == 3
    assert {type(m.impl).__name__ for m in model} == {"SDPAImpl"}
    assert "backend=TORCH_SDPA" in repr(model[0])


def test_inputs_sizes():
    inputs = AttentionInputs(np.array([0, 3, 4], dtype=np.int32), np.array([3, 9], dtype=np.int32),
                             np.zeros((2, 3), dtype=np.int32), np.zeros(4, dtype=np.int64))
    assert (inputs.num_reqs, inputs.num_tokens) == (2, 4)

"""Timing of the attention kernels (GPU only): paged decode bandwidth, paged prefill TFLOP/s, cache-write bandwidth.

Each figure is timed by replaying a CUDA graph of several calls (no host launch overhead in the numbers), median
of repeats, on random data whose KV cache is far larger than the L2. Fractions are of the device's measured
ceilings (`graphserve.benchmarks.roofline`; None on a device never measured). `graphserve bench ops` runs these.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from graphserve.benchmarks.roofline import Ceilings, causal_pairs, device_ceilings, fraction

# Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128.
LLAMA3_8B = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}


def cuda_ceilings() -> Ceilings | None:
    """The measured ceilings of the current CUDA device, or None."""
    return device_ceilings(torch.cuda.get_device_name())


def make_paged_batch(
    q_lens: Sequence[int],
    seq_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    num_pad_rows: int = 0,
    table_width: int | None = None,
    seed: int = 0,
) -> dict:
    """A random paged batch: cache blocks handed out in shuffled order, as a long-running block pool would."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    width = table_width or max(blocks_per_seq)
    block_table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    torch.manual_seed(seed)
    num_tokens = sum(q_lens) + num_pad_rows
    qsl = torch.tensor([0] + torch.tensor(list(q_lens)).cumsum(0).tolist(), dtype=torch.int32)
    return {
        "query": torch.randn(num_tokens, num_heads, head_dim, device=device, dtype=dtype),
        "key_cache": torch.randn(shape, device=device, dtype=dtype),
        "value_cache": torch.randn(shape, device=device, dtype=dtype),
        "block_table": block_table.to(device),
        "seq_lens": torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        "query_start_loc": qsl.to(device),
        "max_query_len": max(q_lens),
        "max_seq_len": max(seq_lens),
    }


def attention_args(batch: dict) -> tuple:
    """The tensor arguments of paged_attention after `out`, in order."""
    return (batch["query"], batch["key_cache"], batch["value_cache"], batch["block_table"], batch["seq_lens"],
            batch["query_start_loc"])


def time_graph(fn: Callable[[], None], calls_per_graph: int = 10, repeats: int = 15) -> float:
    """Median seconds per call: `fn` captured `calls_per_graph` times in one CUDA graph, replayed `repeats` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls_per_graph)
    del graph
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second: this run's bandwidth ceiling."""
    src = torch.empty(num_bytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = time_graph(lambda: dst.copy_(src), calls_per_graph=5, repeats=10)
    return 2 * num_bytes / seconds


def read_bandwidth(num_bytes: int = 1 << 31) -> float:
    """Bytes read per second by a sum over a large bf16 tensor: decode attention only reads its KV."""
    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    seconds = time_graph(lambda: src.sum(), calls_per_graph=5, repeats=10)
    return num_bytes / seconds


def decode_bytes(batch: dict) -> int:
    """Fewest bytes a decode step must move: every cached K/V of every context, the queries and the outputs."""
    kc, q = batch["key_cache"], batch["query"]
    kv = int(batch["seq_lens"].sum()) * kc.shape[2] * kc.shape[3] * 2 * kc.element_size()
    return kv + 2 * q.numel() * q.element_size()


def bench_decode(
    num_seqs: int = 64, context: int = 2048, variants: Sequence[dict] = ({},), block_size: int = 16,
    shape: dict = LLAMA3_8B, dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Paged decode kernel time and bandwidth for each launch variant (keyword overrides of the wrapper)."""
    from graphserve.ops.triton.paged_attention import default_num_splits, paged_decode_attention

    batch = make_paged_batch([1] * num_seqs, [context] * num_seqs, block_size=block_size, dtype=dtype, **shape)
    out = torch.empty_like(batch["query"])
    args = attention_args(batch)
    num_bytes = decode_bytes(batch)
    scale = shape["head_dim"] ** -0.5
    peak = getattr(cuda_ceilings(), "bytes_per_s", None)
    rows = []
    for variant in variants:
        def call(variant: dict = variant) -> None:
            paged_decode_attention(out, *args, scale, 0, context, **variant)

        seconds = time_graph(call)
        splits = variant.get("num_splits") or default_num_splits(num_seqs, shape["num_kv_heads"], context,
                                                                 out.device)
        rows.append({"num_seqs": num_seqs, "context": context, **variant, "num_splits": splits,
                     "heuristic_splits": "num_splits" not in variant,
                     "us": seconds * 1e6, "GB_per_s": num_bytes / seconds / 1e9,
                     "bandwidth_fraction": fraction(num_bytes / seconds, peak), "bytes": num_bytes})
    return rows


def causal_flops(q_len: int, seq_len: int, num_heads: int, head_dim: int) -> int:
    """QK^T and PV FLOPs of one sequence's chunk over its causal context (only the visible pairs)."""
    return 4 * num_heads * head_dim * causal_pairs(q_len, seq_len)


def bench_prefill(
    prompt_len: int, variants: Sequence[dict] = ({},), shape: dict = LLAMA3_8B, dtype: torch.dtype = torch.bfloat16,
    with_sdpa: bool = True,
) -> list[dict]:
    """Paged prefill kernel TFLOP/s on one causal prompt, and torch SDPA (dense, unpaged) on the same shape."""
    from graphserve.ops.triton.prefill_attention import paged_prefill_attention

    batch = make_paged_batch([prompt_len], [prompt_len], dtype=dtype, **shape)
    out = torch.empty_like(batch["query"])
    args = attention_args(batch)
    flops = causal_flops(prompt_len, prompt_len, shape["num_heads"], shape["head_dim"])
    scale = shape["head_dim"] ** -0.5
    peak = getattr(cuda_ceilings(), "flop_per_s", None)
    rows = []
    for variant in variants:
        def call(variant: dict = variant) -> None:
            paged_prefill_attention(out, *args, scale, 0, prompt_len, **variant)

        seconds = time_graph(call)
        rows.append({"kernel": "triton_paged_prefill", "prompt_len": prompt_len, **variant, **shape,
                     "us": seconds * 1e6,
                     "TFLOP_per_s": flops / seconds / 1e12, "compute_fraction": fraction(flops / seconds, peak)})
    if with_sdpa:
        q = batch["query"].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        k = torch.randn(1, shape["num_kv_heads"], prompt_len, shape["head_dim"], device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        seconds = time_graph(lambda: sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        rows.append({"kernel": "torch_sdpa_dense", "prompt_len": prompt_len, **shape, "us": seconds * 1e6,
                     "TFLOP_per_s": flops / seconds / 1e12, "compute_fraction": fraction(flops / seconds, peak)})
    return rows


def bench_reshape_and_cache(num_tokens: int = 4096, shape: dict = LLAMA3_8B,
                            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Cache write of a prefill's K/V: bytes = K and V read once and written once."""
    from graphserve.ops.triton.reshape_and_cache import reshape_and_cache

    num_kv_heads, head_dim = shape["num_kv_heads"], shape["head_dim"]
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    value = torch.randn_like(key)
    num_blocks = num_tokens // 16 + 1
    key_cache = torch.zeros(num_blocks, 16, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(num_blocks * 16, device="cuda")[:num_tokens]
    seconds = time_graph(lambda: reshape_and_cache(key, value, key_cache, value_cache, slots))
    num_bytes = 4 * key.numel() * key.element_size() + slots.numel() * 8
    return {"num_tokens": num_tokens, "us": seconds * 1e6, "GB_per_s": num_bytes / seconds / 1e9,
            "bandwidth_fraction": fraction(num_bytes / seconds, getattr(cuda_ceilings(), "bytes_per_s", None))}



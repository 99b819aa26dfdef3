"""Timing of the multi-LoRA ops (GPU only): µs per `lora_shrink` / `lora_expand` and the bandwidth of what they move.

Each point runs one LoRA-enabled layer of Llama-3-8B (rank 16, 8 adapter slots, every slot loaded) on T tokens spread
evenly over the adapters (token t uses slot t mod 8, so the kernels' sorted gather is exercised), through
`torch.ops.graphserve.lora_shrink` / `lora_expand` (the kernels the platform registered), timed by replaying a CUDA
graph; several copies of the adapter weights are cycled so that the L2 never holds them. The bytes counted are what
each op must move: shrink reads the active slots' A and x and writes the fp32 buffer; expand reads the active slots'
B and the buffer, and reads and writes y.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from graphserve.benchmarks.attention_kernels import cuda_ceilings, time_graph
from graphserve.benchmarks.roofline import fraction
from graphserve.ops.lora import LoRAMeta, lora_token_metadata

# Llama-3-8B's LoRA-enabled projections as the engine runs them: (name, H_in, output slices).
LLAMA3_8B_LORA_LAYERS = (("qkv_proj", 4096, (4096, 1024, 1024)), ("gate_up_proj", 4096, (14336, 14336)),
                         ("down_proj", 14336, (4096,)))
_L2_BYTES = 64 << 20


def _meta(num_tokens: int, num_loras: int) -> LoRAMeta:
    token_lora = (torch.arange(num_tokens, dtype=torch.int32) % num_loras).to(torch.int32)
    sorted_ids, ids, start = lora_token_metadata(token_lora, num_loras)
    return LoRAMeta(*(t.cuda() for t in (token_lora, sorted_ids, ids, start)))


def _copies(num_bytes: int) -> int:
    return max(2, -(-2 * _L2_BYTES // num_bytes))


def bench_lora_layer(
    name: str, h_in: int, slices: Sequence[int], batch_sizes: Sequence[int], rank: int = 16, num_loras: int = 8,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Two rows per batch size (shrink, then expand): µs per call, bytes moved / time as GB/s and a fraction of the
    copy ceiling."""
    n, width = sum(slices), len(slices) * rank
    offsets = [0]
    for n_s in slices:
        offsets.append(offsets[-1] + n_s)
    item = torch.empty((), dtype=dtype).element_size()
    a_bytes, b_bytes = num_loras * width * h_in * item, num_loras * n * rank * item
    lora_a = [torch.randn(num_loras, width, h_in, device="cuda", dtype=dtype) * 0.01 for _ in range(_copies(a_bytes))]
    lora_b = [torch.randn(num_loras, n, rank, device="cuda", dtype=dtype) * 0.01 for _ in range(_copies(b_bytes))]
    peak = getattr(cuda_ceilings(), "bytes_per_s", None)
    rows = []
    for t in batch_sizes:
        meta = _meta(t, num_loras)
        active = min(t, num_loras)
        x = torch.randn(t, h_in, device="cuda", dtype=dtype)
        y = torch.zeros(t, n, device="cuda", dtype=dtype)
        buf = torch.zeros(t, width, device="cuda", dtype=torch.float32)
        turn = {"a": 0, "b": 0}

        def shrink(x=x, buf=buf, meta=meta, turn=turn) -> None:
            torch.ops.graphserve.lora_shrink(buf, x, lora_a[turn["a"] % len(lora_a)], *meta)
            turn["a"] += 1

        def expand(y=y, buf=buf, meta=meta, turn=turn) -> None:
            torch.ops.graphserve.lora_expand(y, buf, lora_b[turn["b"] % len(lora_b)], *meta, offsets)
            turn["b"] += 1

        points = (("shrink", shrink, active * width * h_in * item + t * h_in * item + t * width * 4),
                  ("expand", expand, active * n * rank * item + t * width * 4 + 2 * t * n * item))
        for op, fn, num_bytes in points:
            seconds = time_graph(fn)
            rows.append({
                "layer": name, "op": op, "T": t, "H_in": h_in, "slices": list(slices), "rank": rank,
                "num_loras": num_loras, "us": round(seconds * 1e6, 2), "GB_per_s": round(num_bytes / seconds / 1e9, 1),
                "bandwidth_fraction": fraction(num_bytes / seconds, peak),
            })
    return rows


def bench_lora(batch_sizes: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every Llama-3-8B LoRA layer at every batch size."""
    return [row for name, h_in, slices in LLAMA3_8B_LORA_LAYERS
            for row in bench_lora_layer(name, h_in, slices, batch_sizes, dtype=dtype)]

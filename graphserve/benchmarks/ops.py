"""`graphserve bench ops`: attention and quantized-GEMM op microbenchmarks against the device's ceilings (GPU only).

Paged decode attention bandwidth (GB/s: every cached K/V of every context read once, as a fraction of the copy
ceiling), paged prefill attention TFLOP/s (causal pairs only; torch SDPA on the same dense shape next to it, as a
fraction of the matmul ceiling) and the cache-write bandwidth, plus this run's own copy bandwidth. The shape is
Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128) unless overridden. Then the quantized GEMM at
Llama-3-8B's four projection shapes: bandwidth of the packed weights it reads, and the dense GEMM beside it. With
--lora-batch-sizes, also the multi-LoRA shrink / expand ops at Llama-3-8B's qkv, gate_up and down shapes.

    graphserve bench ops --out perf/results/h200/attention_ops.json
"""
from __future__ import annotations

import argparse


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the op benchmark's flags on `parser`."""
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[64], help="decode batch sizes")
    parser.add_argument("--context", type=int, nargs="+", default=[2048], help="decode context lengths")
    parser.add_argument("--prefill-lens", type=int, nargs="*", default=[1024, 4096], help="prefill prompt lengths")
    parser.add_argument("--num-heads", type=int, default=32, help="query heads")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="head size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="data type")
    parser.add_argument("--quant-batch-sizes", type=int, nargs="*", default=[1, 16, 64, 256],
                        help="rows of the quantized GEMM points (none: skip them)")
    parser.add_argument("--quant-bits", type=int, default=4, choices=[2, 4, 8], help="bits of the quantized GEMMs")
    parser.add_argument("--quant-group-size", type=int, default=128, help="group size of the quantized GEMMs")
    parser.add_argument("--quant-variants", default="",
                        help='also time launch variants of the quantized GEMM at each --quant-batch-sizes row count: '
                             '"gemv:block_n=128,block_r=16,split_k=4,num_warps=4;dot:block_m=16,block_n=64,..." '
                             '(fields of GemmConfig; split_k=0: the heuristic\'s)')
    parser.add_argument("--gguf-types", nargs="*", default=[],
                        help="also time the GGUF GEMM in these ggml types (Q4_K Q6_K Q8_0 ...) at --quant-batch-sizes")
    parser.add_argument("--moe-tokens", type=int, nargs="*", default=[],
                        help="also time the fused MoE op at Mixtral-8x7B and Qwen3-30B-A3B shapes for these token "
                             "counts (e.g. 1 64 2048), against a per-expert loop of GEMMs")
    parser.add_argument("--lora-batch-sizes", type=int, nargs="*", default=[],
                        help="tokens of the multi-LoRA shrink / expand points (none: skip them)")
    parser.add_argument("--skip-attention", action="store_true", help="time only the quantized GEMMs")
    parser.add_argument("--out", default=None, help="write the JSON record to this file")
    return parser


def main(args: argparse.Namespace) -> int:
    """Time every decode point, every prefill length and the cache write; write one record."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("graphserve bench ops times GPU kernels; no GPU is visible")
    from graphserve.benchmarks import attention_kernels as k
    from graphserve.benchmarks import gguf_kernels, lora_kernels, moe_kernels, quant_kernels
    from graphserve.benchmarks.common import write_record
    from graphserve.platforms import current_platform

    current_platform().kernel_choices()  # registers the platform's kernels on the ops

    shape = {"num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim}
    dtype = getattr(torch, args.dtype)
    ceilings = k.cuda_ceilings()
    results = {
        "shape": shape, "dtype": args.dtype, "ceilings": ceilings.to_dict() if ceilings else None,
        "copy_bandwidth_GBps": round(k.copy_bandwidth() / 1e9, 1),
        "decode": [] if args.skip_attention else [row for n in args.num_seqs for c in args.context
                                                  for row in k.bench_decode(n, c, shape=shape, dtype=dtype)],
        "prefill": [] if args.skip_attention else [row for n in args.prefill_lens
                                                   for row in k.bench_prefill(n, shape=shape, dtype=dtype)],
        "reshape_and_cache": None if args.skip_attention else k.bench_reshape_and_cache(shape=shape, dtype=dtype),
        "quant_gemm": [row for name, kk, n in quant_kernels.LLAMA3_8B_GEMMS
                       for row in quant_kernels.bench_quant_gemm(name, kk, n, args.quant_batch_sizes, args.quant_bits,
                                                                 args.quant_group_size, dtype)]
        if args.quant_batch_sizes else [],
        "lora": lora_kernels.bench_lora(args.lora_batch_sizes, dtype) if args.lora_batch_sizes else [],
        "gguf_gemm": gguf_kernels.bench_llama8b(args.gguf_types, args.quant_batch_sizes, dtype) if args.gguf_types
        else [],
        "fused_moe": [row for name in moe_kernels.MOE_SHAPES for row in moe_kernels.bench_moe(name, args.moe_tokens,
                                                                                              dtype)],
    }
    if args.quant_variants:
        results["quant_variants"] = quant_kernels.bench_variants(
            quant_kernels.parse_variants(args.quant_variants), args.quant_batch_sizes, bits=args.quant_bits,
            group_size=args.quant_group_size, dtype=dtype)
    write_record("attention_ops", results, args.out, getattr(args, "argv", None))
    return 0

"""`graphserve bench latency`: fixed-batch decode speed and time to first token, against the device's roofline.

Each of `--batch-sizes` runs one batch of random prompts (`--input-len` tokens) decoding exactly `--output-len`
tokens. The prefill is timed apart (one new token) and subtracted, so the reported rate is the decode rate
(tokens/s over the batch and per sequence, and ms per step), from the best of `--repeats` runs of each. Its
roofline: the bytes a step must read (every weight except the embedding rows, plus each sequence's cached K/V)
and its FLOPs, against the device's measured bandwidth and matmul ceilings. `--ttft-lens` times single prompts
of those lengths producing one token (median of `--repeats`); their roofline is the prefill's FLOPs
(2 x non-embedding parameters per token, the LM head once, causal attention).

    graphserve bench latency --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \\
        --out perf/results/h200/latency_llama8b.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from graphserve.engine.arg_utils import EngineArgs


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from graphserve.benchmarks.lora_adapters import add_lora_bench_args

    """Register the latency benchmark's flags and the engine flags on `parser`."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256],
                        help="decode batch sizes, each run as one fixed batch")
    parser.add_argument("--input-len", type=int, default=16, help="prompt tokens of each decoding sequence")
    parser.add_argument("--output-len", type=int, default=256, help="tokens each decoding sequence generates")
    parser.add_argument("--ttft-lens", type=int, nargs="*", default=[128, 1024, 4096],
                        help="prompt lengths whose time to first token is measured (one prompt at a time)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per point (decode: the best run; TTFT: the median, and the best)")
    parser.add_argument("--out", default=None, help="write the JSON record to this file")
    parser.add_argument("--verbose", action="store_true", help="log the engine's start-up phases")
    add_lora_bench_args(parser)
    EngineArgs.add_cli_args(parser)
    return parser


def _timed_generate(llm: Any, platform: Any, prompts: list[list[int]], params: Any, loras: list | None = None) -> float:
    """Seconds for one generate call (requests spread over `loras` if given), device synchronised around it."""
    from graphserve.benchmarks.lora_adapters import spread

    platform.synchronize(platform.device())
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                 lora_request=spread(loras or [], len(prompts)))
    platform.synchronize(platform.device())
    return time.perf_counter() - t0


def decode_roofline(cost: Any, ceilings: Any, batch_size: int, input_len: int, output_len: int,
                    decode_s: float | None) -> dict:
    """Bytes and FLOPs of the decode steps of one batch run, and the fractions of the ceilings they reached."""
    from graphserve.benchmarks.roofline import fraction, sig

    if cost is None:
        return {"bandwidth_fraction": None, "compute_fraction": None}
    steps = output_len - 1
    # The step producing output token j (j >= 1) attends over the prompt and j cached outputs, itself included.
    contexts = [[input_len + j] * batch_size for j in range(1, output_len)]
    total_bytes = sum(cost.decode_step_bytes(c) for c in contexts)
    total_flops = sum(cost.decode_step_flops(c) for c in contexts)
    bytes_per_s = total_bytes / decode_s if decode_s else None
    flop_per_s = total_flops / decode_s if decode_s else None
    row = {"bytes_per_step": round(total_bytes / steps), "flops_per_step": round(total_flops / steps),
           "achieved_GB_per_s": sig(bytes_per_s and bytes_per_s / 1e9),
           "achieved_TFLOP_per_s": sig(flop_per_s and flop_per_s / 1e12),
           "bandwidth_fraction": fraction(bytes_per_s, ceilings and ceilings.bytes_per_s),
           "compute_fraction": fraction(flop_per_s, ceilings and ceilings.flop_per_s)}
    if ceilings is not None:
        bound_s = max(total_bytes / ceilings.bytes_per_s, total_flops / ceilings.flop_per_s)
        row["roofline_ms_per_step"] = round(1e3 * bound_s / steps, 3)
    return row


def ttft_roofline(cost: Any, ceilings: Any, prompt_len: int, ttft_s: float) -> dict:
    """Prefill FLOPs of one prompt and the fraction of the matmul ceiling its time to first token reached."""
    from graphserve.benchmarks.roofline import fraction, sig

    if cost is None:
        return {"compute_fraction": None}
    flops = cost.prefill_flops(prompt_len)
    row = {"prefill_flops": flops, "achieved_TFLOP_per_s": sig(flops / ttft_s / 1e12),
           "compute_fraction": fraction(flops / ttft_s, ceilings and ceilings.flop_per_s)}
    if ceilings is not None:
        row["roofline_ttft_ms"] = round(1e3 * flops / ceilings.flop_per_s, 3)
    return row


def _decode_point(llm: Any, platform: Any, args: argparse.Namespace, batch_size: int, seeds: Any,
                  loras: list | None = None) -> dict:
    """Median prefill-only and full times of one batch size; the decode rate is their difference."""
    from graphserve import SamplingParams
    from graphserve.benchmarks.datasets import random_token_prompts

    vocab = llm.llm_engine.model_config.vocab_size

    def run(params) -> float:
        # Fresh prompts every run, so an (automatic) prefix-cache hit never shortens a prefill.
        prompts = random_token_prompts(batch_size, args.input_len, vocab, next(seeds))
        return _timed_generate(llm, platform, prompts, params, loras)

    run(SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    prefill_only = SamplingParams(max_tokens=1, ignore_eos=True)
    decode = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    prefills, totals = [], []
    for _ in range(args.repeats):  # interleaved, so a slow spell of the host hits both kinds of run alike
        prefills.append(run(prefill_only))
        totals.append(run(decode))
    # Best of the repeats: interference only ever adds time, and a difference of two medians can turn negative on
    # a busy host. The medians are recorded next to them.
    prefill, total = min(prefills), min(totals)
    steps = args.output_len - 1
    decode_s = total - prefill
    ok = decode_s > 0 and steps > 0  # on a noisy machine the subtraction can be meaningless: report nothing then
    return {
        "batch_size": batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "total_s": round(total, 4), "prefill_s": round(prefill, 4),
        "total_s_median": round(statistics.median(totals), 4),
        "prefill_s_median": round(statistics.median(prefills), 4),
        "ms_per_step": round(1e3 * decode_s / steps, 3) if ok else None,
        "decode_tokens_per_s": round(batch_size * steps / decode_s, 1) if ok else None,
        "tokens_per_s_per_seq": round(steps / decode_s, 1) if ok else None,
        "end_to_end_output_tokens_per_s": round(batch_size * args.output_len / total, 1),
        "decode_s": round(decode_s, 4) if ok else None,
    }


def main(args: argparse.Namespace) -> int:
    """Load the engine once, run every decode batch size and TTFT length, write one record."""
    from graphserve import LLM, SamplingParams
    from graphserve.benchmarks.common import write_record
    from graphserve.benchmarks.datasets import random_token_prompts
    from graphserve.benchmarks.lora_adapters import bench_lora_requests
    from graphserve.benchmarks.roofline import device_ceilings, loaded_model, model_cost
    from graphserve.benchmarks.tokenizer import bench_engine_args
    from graphserve.platforms import resolve_platform

    if args.verbose:
        import logging

        logging.getLogger().setLevel(logging.INFO)
    if args.output_len < 2:
        raise ValueError("--output-len must be at least 2: the decode rate needs one step after the prefill")
    engine_args = bench_engine_args(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup_s = time.perf_counter() - t0
    mc = llm.llm_engine.model_config
    # A sequence holds its prompt and every generated token but the last.
    too_long = [n for n in [args.input_len + args.output_len - 1, *args.ttft_lens] if n >= mc.max_model_len]
    if too_long:
        raise ValueError(f"lengths {too_long} do not fit max_model_len {mc.max_model_len}")
    platform = resolve_platform(engine_args.device)
    ceilings = device_ceilings(platform.device_name())
    model = loaded_model(llm)
    cost = model_cost(model, mc) if model is not None else None
    seeds = iter(range(1, 1_000_000))
    loras = bench_lora_requests(args, llm)
    decode_rows = []
    for bs in args.batch_sizes:
        row = _decode_point(llm, platform, args, bs, seeds, loras)
        row.update(decode_roofline(cost, ceilings, bs, args.input_len, args.output_len, row["decode_s"]))
        decode_rows.append(row)
    ttft_rows = []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for n in args.ttft_lens:
        _timed_generate(llm, platform, random_token_prompts(1, n, mc.vocab_size, next(seeds)), one)  # warm-up
        times = [_timed_generate(llm, platform, random_token_prompts(1, n, mc.vocab_size, next(seeds)), one)
                 for _ in range(args.repeats)]
        ttft = statistics.median(times)
        ttft_rows.append({"prompt_len": n, "ttft_ms": round(1e3 * ttft, 2),
                          "ttft_ms_best": round(1e3 * min(times), 2), **ttft_roofline(cost, ceilings, n, ttft)})
    results = {
        "model": engine_args.model, "dtype": mc.dtype, "device": platform.device_name(),
        "ceilings": ceilings.to_dict() if ceilings else None, "model_cost": cost.to_dict() if cost else None,
        "startup_s": round(startup_s, 2), "decode": decode_rows, "ttft": ttft_rows,
        "lora": {"num_adapters": len(loras), "rank": args.lora_rank} if loras else None,
        "engine_args": {k: v for k, v in vars(engine_args).items() if v is not None},
    }
    write_record("latency", results, args.out, getattr(args, "argv", None))
    return 0

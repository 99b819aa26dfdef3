"""Prefix caching: a shared system prompt before every request's unique tail; TTFT and throughput, cache on vs off.

Two measurements per mode (off, then on), each on a fresh engine:
  * batch: all requests submitted at once (offline throughput; TTFT = first token time - submission time);
  * single: afterwards, one request at a time with the shared prefix and a new tail (the TTFT a user sees when the
    system prompt is already cached, against a full prefill).

    python -m perf.bench_prefix_cache --num-requests 64 --output-len 32 --num-single 5 \
        --out perf/results/cpu/prefix_cache_smollm2_1k_prefix_64req.json      # the default model, fp32
    python -m perf.bench_prefix_cache --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \
        --num-requests 64 --output-len 32 --out perf/results/h200/prefix_cache_llama8b.json   # on a GPU

The engine flags are those of `graphserve generate`; --enable-prefix-caching is overridden by --modes.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

from perf.common import write_record


def make_prompts(num_requests: int, prefix_len: int, unique_len: int, vocab_size: int, seed: int):
    """One shared random prefix, then a different random tail per request (token ids away from special ids)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab_size - 10) for _ in range(prefix_len)]
    tails = [[rng.randrange(10, vocab_size - 10) for _ in range(unique_len)] for _ in range(num_requests)]
    return prefix, tails


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ttft_summary(ttfts: list[float]) -> dict:
    return {
        "ttft_mean_ms": round(1e3 * statistics.fmean(ttfts), 2),
        "ttft_median_ms": round(1e3 * statistics.median(ttfts), 2),
        "ttft_p90_ms": round(1e3 * _percentile(ttfts, 0.9), 2),
        "ttft_max_ms": round(1e3 * max(ttfts), 2),
    }


def run_batch(engine, prompts: list[list[int]], params, tag: str) -> dict:
    """Submit every prompt at once, step until done; per-request TTFT and the total throughput."""
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, params)
    first_token: dict[str, float] = {}
    num_out = 0
    num_cached = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter()
            if output.request_id not in first_token and output.outputs and output.outputs[0].token_ids:
                first_token[output.request_id] = now - t0
            num_out += sum(len(c.token_ids) for c in output.outputs)  # DELTA outputs: only the new tokens
            if output.finished:
                num_cached += output.num_cached_tokens
    elapsed = time.perf_counter() - t0
    num_in = sum(len(p) for p in prompts)
    return {
        "num_requests": len(prompts),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tokens_per_s": round(num_out / elapsed, 2),
        "total_tokens_per_s": round((num_in + num_out) / elapsed, 2),
        "num_cached_tokens": num_cached,
        **_ttft_summary(list(first_token.values())),
    }


def run_single(engine, prefix: list[int], tails: list[list[int]], params, tag: str) -> dict:
    """One request at a time (nothing else running): the TTFT of a prefill with or without the cached prefix."""
    ttfts = []
    for i, tail in enumerate(tails):
        t0 = time.perf_counter()
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prefix + tail}, params)
        ttft = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if ttft is None and output.outputs and output.outputs[0].token_ids:
                    ttft = time.perf_counter() - t0
        ttfts.append(ttft)
    return _ttft_summary(ttfts)


def run_mode(engine_args, enable: bool, prefix, tails, single_tails, params, single_params) -> dict:
    """Build an engine with prefix caching on or off, warm it up, measure batch and single-request runs."""
    import dataclasses

    from graphserve import LLM

    llm = LLM(**vars(dataclasses.replace(engine_args, enable_prefix_caching=enable)))
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    dtype = engine.model_config.dtype
    # Warm-up on unrelated tokens (first-call allocations, kernel selection), then forget it.
    warm = [t[: len(t) // 2] for t in single_tails[:2]]
    run_batch(engine, warm, single_params, "warmup")
    llm.reset_prefix_cache()
    queries0, hits0 = scheduler.prefix_cache_queries, scheduler.prefix_cache_hits
    batch = run_batch(engine, [prefix + t for t in tails], params, "batch")
    batch.update(
        prefix_cache_queries=scheduler.prefix_cache_queries - queries0,
        prefix_cache_hits=scheduler.prefix_cache_hits - hits0,
        num_preemptions=scheduler.num_preemptions,
        num_kv_blocks=scheduler.kv_cache_manager.num_blocks,
    )
    single = run_single(engine, prefix, single_tails, single_params, "single")
    del llm, engine, scheduler
    # EngineCore froze everything built at start-up (gc.freeze): unfreeze so that the next engine gets its memory.
    gc.unfreeze()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"dtype": dtype, "batch": batch, "single": single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024, help="shared system-prompt tokens")
    parser.add_argument("--unique-len", type=int, default=128, help="unique tokens per request")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-single", type=int, default=3, help="one-at-a-time requests for the single TTFT")
    parser.add_argument("--modes", default="off,on", help="prefix caching off and/or on, in this order")
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    from graphserve.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    from graphserve import SamplingParams
    from graphserve.models.config_loader import create_model_config
    from graphserve.sampling_params import RequestOutputKind
    from perf.dummy_model import bench_engine_args

    engine_args = bench_engine_args(args)
    vocab_size = create_model_config(engine_args.model, load_format=engine_args.load_format).vocab_size
    prefix, tails = make_prompts(args.num_requests + args.num_single, args.prefix_len, args.unique_len,
                                 vocab_size, args.prompt_seed)
    tails, single_tails = tails[: args.num_requests], tails[args.num_requests:]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    single_params = SamplingParams(temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.DELTA)
    load_average = os.getloadavg()[0]  # the CPU machine is shared: contention shows here
    results = {
        "load_average_1m_at_start": round(load_average, 2),
        "model": engine_args.model or "SmolLM2-135M-Instruct (default, GGUF Q4_1 dequantized)",
        "dtype_arg": engine_args.dtype,
        "load_format": engine_args.load_format,
        "workload": {"num_requests": args.num_requests, "shared_prefix_len": args.prefix_len,
                     "unique_len": args.unique_len, "output_len": args.output_len, "num_single": args.num_single},
    }
    for mode in args.modes.split(","):
        if mode not in ("off", "on"):
            parser.error(f"--modes takes off and/or on, got {mode!r}")
        results[f"cache_{mode}"] = run_mode(engine_args, mode == "on", prefix, tails, single_tails, params,
                                            single_params)
    if "cache_on" in results and "cache_off" in results:
        on, off = results["cache_on"], results["cache_off"]
        results["speedup"] = {
            "throughput": round(on["batch"]["total_tokens_per_s"] / off["batch"]["total_tokens_per_s"], 2),
            "batch_ttft_mean": round(off["batch"]["ttft_mean_ms"] / on["batch"]["ttft_mean_ms"], 2),
            "single_ttft_median": round(off["single"]["ttft_median_ms"] / on["single"]["ttft_median_ms"], 2),
        }
    write_record("prefix_cache", results, args.out)


if __name__ == "__main__":
    main()

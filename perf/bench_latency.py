"""Latency: fixed-batch decode speed and time to first token, through the offline engine.

Each of `--batch-sizes` runs one batch of random prompts (`--input-len` tokens) decoding exactly `--output-len`
tokens; reports the decode rate (tokens/s over the whole batch, and per sequence) and the wall time per step.
`--ttft-lens` times single prompts of those lengths generating one token (time to first token).

    python perf/bench_latency.py --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \
        --batch-sizes 1 64 --input-len 16 --output-len 256 --ttft-lens 128 1024 4096
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.bench_throughput import random_token_prompts  # noqa: E402
from perf.common import write_record  # noqa: E402


def _timed_generate(llm, prompts, params) -> float:
    """Seconds for one generate call, with the device synchronised before and after."""
    from graphserve.platforms import current_platform

    plat = current_platform()
    plat.synchronize(plat.device())
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    plat.synchronize(plat.device())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--ttft-lens", type=int, nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median reported)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--verbose", action="store_true", help="log the engine's start-up phases")
    from graphserve.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")

    from graphserve import LLM, SamplingParams

    from perf.dummy_model import bench_engine_args

    engine_args = bench_engine_args(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.vocab_size
    results = {"startup_s": round(startup_s, 2), "decode": [], "ttft": []}
    decode = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Fresh random prompts for every timed run, so an (automatic) prefix-cache hit never shortens a prefill.
    seeds = iter(range(1, 1_000_000))
    for bs in args.batch_sizes:
        def run(params):
            return _timed_generate(llm, random_token_prompts(bs, args.input_len, vocab, next(seeds)), params)

        run(SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        # Prefill cost is measured apart and subtracted, so the rate is the decode rate.
        prefill = statistics.median(run(SamplingParams(max_tokens=1, ignore_eos=True)) for _ in range(args.repeats))
        total = statistics.median(run(decode) for _ in range(args.repeats))
        decode_s = total - prefill
        steps = args.output_len - 1
        ok = decode_s > 0  # a noisy machine can make the subtraction meaningless: report nothing then
        results["decode"].append({
            "batch_size": bs, "input_len": args.input_len, "output_len": args.output_len,
            "total_s": round(total, 4), "prefill_s": round(prefill, 4),
            "ms_per_step": round(1e3 * decode_s / steps, 3) if ok else None,
            "decode_tokens_per_s": round(bs * steps / decode_s, 1) if ok else None,
            "tokens_per_s_per_seq": round(steps / decode_s, 1) if ok else None,
            "end_to_end_output_tokens_per_s": round(bs * args.output_len / total, 1),
        })
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for n in args.ttft_lens:
        _timed_generate(llm, random_token_prompts(1, n, vocab, next(seeds)), one)
        ttft = statistics.median(
            _timed_generate(llm, random_token_prompts(1, n, vocab, next(seeds)), one) for _ in range(args.repeats))
        results["ttft"].append({"prompt_len": n, "ttft_ms": round(1e3 * ttft, 2)})
    results["engine_args"] = {k: v for k, v in vars(engine_args).items() if v is not None}
    write_record("latency", results, args.out)


if __name__ == "__main__":
    main()

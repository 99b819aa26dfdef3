"""Where a decode step's time goes: torch.profiler over steady-state decode steps of a fixed batch.

Prints the wall time per step, the device-busy time per step (sum of kernel time), the idle gap between them
(host work the GPU waits for), and the top kernels; writes the table as JSON.

    python -m perf.profile_decode --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \
        --batch-size 1 --steps 32 --out $OUT/profile_decode_b1.json
"""
from __future__ import annotations

import argparse
import time

from perf.bench_throughput import random_token_prompts
from perf.common import write_record


def _decode_steps(llm, num_steps: int) -> float:
    """Run `num_steps` engine steps (all requests decoding); returns wall seconds."""
    from graphserve.platforms import current_platform

    plat = current_platform()
    engine = llm.llm_engine
    plat.synchronize(plat.device())
    t0 = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    plat.synchronize(plat.device())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=15, help="kernels to list")
    parser.add_argument("--out", default=None)
    from graphserve.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from graphserve import LLM, SamplingParams
    from perf.dummy_model import bench_engine_args

    engine_args = bench_engine_args(args)
    llm = LLM(**vars(engine_args))
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 16, ignore_eos=True)
    for i, prompt in enumerate(random_token_prompts(args.batch_size, args.input_len, vocab, seed=1)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    while engine.engine_core.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.engine_core.scheduler.running):
        engine.step()
    _decode_steps(llm, args.steps)  # warm-up: every shape seen once
    wall_plain = _decode_steps(llm, args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall_profiled = _decode_steps(llm, args.steps)
    device_attr = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, device_attr, 0) > 0]
    kernels = sorted(events, key=lambda e: getattr(e, device_attr), reverse=True)
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in events) if torch.cuda.is_available() else None
    step_us = 1e6 * wall_plain / args.steps
    results = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "wall_us_per_step": round(step_us, 1),
        "wall_us_per_step_profiled": round(1e6 * wall_profiled / args.steps, 1),
        "device_busy_us_per_step": None if busy_us is None else round(busy_us / args.steps, 1),
        "device_idle_us_per_step": None if busy_us is None else round(step_us - busy_us / args.steps, 1),
        "top": [{"name": e.key[:120], "calls": e.count, "us_per_step": round(getattr(e, device_attr) / args.steps, 1)}
                for e in kernels[: args.top]],
    }
    for row in results["top"]:
        print(f"{row['us_per_step']:10.1f} us/step  x{row['calls']:<5d} {row['name']}")
    write_record("profile_decode", results, args.out)


if __name__ == "__main__":
    main()

"""Host cost of the scheduler per engine step: schedule() + update_from_output() at N running decode requests.

The model runner is replaced by a precomputed ModelRunnerOutput (one token per request), so only scheduler time is
measured. Prints one JSON object (times in microseconds).

    python -m perf.bench_scheduler --num-requests 256 --steps 2000
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from graphserve.config import CacheConfig, SchedulerConfig
from graphserve.core.request import Request
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import ModelRunnerOutput
from graphserve.sampling_params import SamplingParams


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256, help="running decode requests")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=100, help="untimed decode steps first")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    return parser.parse_args()


def _percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


def _summary(samples: list[int]) -> dict[str, float]:
    return {
        "median_us": statistics.median(samples) / 1e3,
        "mean_us": statistics.fmean(samples) / 1e3,
        "p90_us": _percentile(samples, 0.90),
        "p99_us": _percentile(samples, 0.99),
    }


def main() -> None:
    """Fill the scheduler with decode requests, then time many steps."""
    args = _parse_args()
    total_steps = args.warmup + args.steps
    # Requests prefilled first decode during the later prefill steps: leave room so that none finishes.
    max_new_tokens = total_steps + 64
    max_model_len = args.prompt_len + max_new_tokens + 1
    blocks_per_request = -(-max_model_len // args.block_size)
    scheduler = Scheduler(
        SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=args.num_requests,
            max_num_batched_tokens=max(args.max_num_batched_tokens, args.num_requests),
        ),
        CacheConfig(block_size=args.block_size, num_blocks=args.num_requests * blocks_per_request),
    )
    params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=True)
    for i in range(args.num_requests):
        scheduler.add_request(Request(f"req-{i}", [7] * args.prompt_len, params, eos_token_ids=(2,)))
    # Prefill (untimed) until every request is decoding.
    while scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        so = scheduler.schedule()
        done = [rid for rid in so.num_scheduled_tokens
                if scheduler.get_request(rid).num_computed_tokens + so.num_scheduled_tokens[rid]
                == scheduler.get_request(rid).num_tokens]
        req_ids = list(so.num_scheduled_tokens)
        scheduler.update_from_output(so, ModelRunnerOutput(req_ids, [[11] if r in done else [] for r in req_ids]))

    req_ids = [r.request_id for r in scheduler.running]
    sampled = [[11] for _ in req_ids]
    schedule_ns, update_ns, total_ns = [], [], []
    gc.collect()
    for i in range(total_steps):
        t0 = time.perf_counter_ns()
        so = scheduler.schedule()
        t1 = time.perf_counter_ns()
        # Lists are rebuilt per step, as a real runner would; outside the timed region.
        runner_output = ModelRunnerOutput(list(req_ids), [list(t) for t in sampled])
        t2 = time.perf_counter_ns()
        outputs = scheduler.update_from_output(so, runner_output)
        t3 = time.perf_counter_ns()
        assert len(so.num_scheduled_tokens) == args.num_requests and len(outputs) == args.num_requests
        if i >= args.warmup:
            schedule_ns.append(t1 - t0)
            update_ns.append(t3 - t2)
            total_ns.append(t1 - t0 + t3 - t2)
    print(json.dumps({
        "num_running": scheduler.num_running,
        "block_size": args.block_size,
        "steps": args.steps,
        "schedule": _summary(schedule_ns),
        "update_from_output": _summary(update_ns),
        "schedule_plus_update": _summary(total_ns),
        "kv_cache_usage": round(scheduler.kv_cache_usage, 4),
    }, indent=2))


if __name__ == "__main__":
    main()

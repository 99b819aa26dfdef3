"""GPU check: async scheduling gives the same tokens as synchronous steps, and what it gains per decode step.

One engine (a second 8B engine would not fit next to the first one's KV pool); the scheduling mode is switched
between runs, with nothing in flight. Greedy, mixed prompt lengths, stop ids so that requests end at
different steps (each stop leaves one discarded token behind in async mode).

    python perf/gpu_check_async.py --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \
        --out $OUT/async_check.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.bench_throughput import random_token_prompts  # noqa: E402
from perf.common import write_record  # noqa: E402


def _generate(llm, prompts, params, async_scheduling: bool):
    from graphserve.platforms import current_platform

    core = llm.llm_engine.engine_core
    while core.has_unfinished_requests():  # an async run may leave its last (discarded) step in flight
        core.step()
    core.async_scheduling = async_scheduling
    plat = current_platform()
    plat.synchronize(plat.device())
    t0 = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    plat.synchronize(plat.device())
    return outputs, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default=None)
    from graphserve.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()

    from graphserve import LLM, SamplingParams

    from perf.dummy_model import bench_engine_args

    llm = LLM(**vars(bench_engine_args(args)))
    vocab = llm.llm_engine.model_config.vocab_size
    lens = [5 + (i * 97) % 1500 for i in range(args.num_prompts)]
    prompts = [random_token_prompts(1, n, vocab, seed=100 + i)[0] for i, n in enumerate(lens)]
    free = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    base, _ = _generate(llm, prompts, free, async_scheduling=False)
    # Stop ids taken from the free run: request i stops at (the first occurrence of) its token at step 2 + 3i.
    params = [SamplingParams(temperature=0.0, max_tokens=args.output_len,
                             stop_token_ids=[o.outputs[0].token_ids[min(2 + 3 * i, args.output_len - 1)]])
              for i, o in enumerate(base)]
    results = {"num_prompts": len(prompts), "prompt_lens": lens, "output_len": args.output_len, "runs": []}
    tokens = {}
    for mode in (False, True, False, True):
        outputs, seconds = _generate(llm, prompts, params, async_scheduling=mode)
        tokens[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outputs]
        results["runs"].append({"async_scheduling": mode, "seconds": round(seconds, 4),
                                "output_tokens": sum(len(t) for t, _ in tokens[mode])})
    results["identical"] = tokens[True] == tokens[False]
    results["num_stopped_early"] = sum(1 for _, r in tokens[True] if r == "stop")
    print(f"async vs sync identical: {results['identical']}; stopped early: {results['num_stopped_early']}")
    write_record("async_scheduling_check", results, args.out)
    if not results["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Issue-4 measurements on one GPU with the Llama-3-8B shape (random bf16 weights), one process per phase.

1. cold start (empty compile cache) + decode throughput at batch 1 and 64 (prompt 16, 256 new tokens) + TTFT;
2. warm start (same compile cache);
3. graph replay vs eager: greedy tokens of 16 prompts of mixed lengths must be identical.

    PYTHONPATH=$PWD python3 perf/gpu_llama8b.py --out $OUT/llama8b.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PERF = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(PERF))

MODEL = os.path.join(PERF, "configs", "llama-3-8b")


def _run(cmd: list[str], env: dict, timeout: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, timeout=timeout)
    return time.perf_counter() - t0


def _greedy_tokens(mode: str, path: str, model: str, dtype: str) -> None:
    """Child process: 16 mixed-length prompts, 32 greedy tokens each, written to `path`."""
    import logging
    import random

    from graphserve import SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    from perf.dummy_model import dummy_llm

    kwargs = {"enforce_eager": True} if mode == "eager" else {}
    llm = dummy_llm(model, dtype=dtype, max_num_seqs=32, **kwargs)
    rng = random.Random(0)
    lens = [5, 16, 17, 33, 64, 100, 127, 128, 129, 250, 400, 511, 700, 900, 1000, 1500]
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lens]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_tokens=32,
                        ignore_eos=True, logprobs=1), use_tqdm=False)
    runner = llm.llm_engine.engine_core.model_runner
    from graphserve.compile.counters import compilation_counter

    with open(path, "w") as f:
        json.dump({"tokens": [o.outputs[0].token_ids for o in outs],
                   "logprobs": [[e[t].logprob for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                for o in outs],
                   "graph_runner": getattr(runner, "graph_runner", None) is not None,
                   "counters": {k: v for k, v in vars(compilation_counter).items() if isinstance(v, int)}}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=MODEL, help="a directory with config.json (default: Llama-3-8B shape)")
    parser.add_argument("--ttft-lens", nargs="+", default=["128", "1024", "4096"])
    parser.add_argument("--output-len", default="256")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--child", choices=["graph", "eager"])
    parser.add_argument("--only-graph-vs-eager", action="store_true")
    parser.add_argument("--child-out")
    args = parser.parse_args()
    if args.child:
        _greedy_tokens(args.child, args.child_out, args.model, args.dtype)
        return
    work = tempfile.mkdtemp()
    env = dict(os.environ, GRAPHSERVE_COMPILE_CACHE_DIR=os.path.join(work, "compile_cache"),
               PYTHONPATH=os.path.dirname(PERF), PYTHONUNBUFFERED="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    py = sys.executable
    bench = [py, os.path.join(PERF, "bench_latency.py"), "--model", args.model, "--load-format", "dummy",
             "--dtype", args.dtype]
    result: dict = {}
    if args.only_graph_vs_eager:
        return _graph_vs_eager(args, env, work, py, result)
    cold_json, warm_json = os.path.join(work, "cold.json"), os.path.join(work, "warm.json")
    result["cold_wall_s"] = _run(bench + ["--batch-sizes", "1", "64", "--input-len", "16", "--output-len", args.output_len,
                                          "--ttft-lens", *args.ttft_lens, "--out", cold_json], env, 420)
    result["cold"] = json.load(open(cold_json))
    result["warm_wall_s"] = _run(bench + ["--batch-sizes", "1", "--output-len", "8", "--repeats", "1",
                                          "--out", warm_json], env, 240)
    result["warm"] = json.load(open(warm_json))
    _graph_vs_eager(args, env, work, py, result)


def _graph_vs_eager(args, env, work, py, result) -> None:
    """Children with graphs and with enforce_eager; the greedy tokens must agree."""
    paths = {m: os.path.join(work, f"{m}.json") for m in ("graph", "eager")}
    for mode, path in paths.items():
        _run([py, __file__, "--out", args.out, "--model", args.model, "--dtype", args.dtype, "--child", mode, "--child-out", path], env, 300)
    graph, eager = (json.load(open(paths[m])) for m in ("graph", "eager"))
    same = sum(a == b for a, b in zip(graph["tokens"], eager["tokens"]))
    max_lp = max(abs(x - y) for a, b in zip(graph["logprobs"], eager["logprobs"]) for x, y in zip(a, b))
    result["graph_vs_eager"] = {"identical_sequences": f"{same}/16", "max_abs_logprob_diff": max_lp,
                                "graph_run": {k: graph[k] for k in ("graph_runner", "counters")},
                                "eager_run": {k: eager[k] for k in ("graph_runner", "counters")}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["graph_vs_eager"], indent=1))


if __name__ == "__main__":
    main()

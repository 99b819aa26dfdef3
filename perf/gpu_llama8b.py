"""Start-up of the Llama-3-8B shape (random bf16 weights) with an empty and with a warm compile cache, one process each.

1. cold start (empty compile cache) + decode throughput at batch 1 and 64 (prompt 16, 256 new tokens) + TTFT;
2. warm start (same compile cache), batch 1, 8 new tokens.
Both phases run `perf.bench_latency` in a child process; the record holds both of its records and the wall time
of each child (process start and imports included). Graph replay vs eager correctness is a test now:
`python -m pytest -m gpu` (tests/gpu/).

    python -m perf.gpu_llama8b --out $OUT/llama8b.json
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
ROOT = os.path.dirname(PERF)
MODEL = os.path.join(PERF, "configs", "llama-3-8b")


def _run(cmd: list[str], env: dict, timeout: int) -> float:
    """Run one child from the repository root; returns its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, timeout=timeout)
    return time.perf_counter() - t0


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=MODEL, help="a directory with config.json (default: Llama-3-8B shape)")
    parser.add_argument("--ttft-lens", nargs="+", default=["128", "1024", "4096"])
    parser.add_argument("--output-len", default="256")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    # A fresh compile cache makes the first child's start-up cold; the second child reuses it.
    env = dict(os.environ, GRAPHSERVE_COMPILE_CACHE_DIR=os.path.join(work, "compile_cache"),
               PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    bench = [sys.executable, "-m", "perf.bench_latency", "--model", args.model, "--load-format", "dummy",
             "--dtype", args.dtype]
    result: dict = {}
    cold_json, warm_json = os.path.join(work, "cold.json"), os.path.join(work, "warm.json")
    cold_args = ["--batch-sizes", "1", "64", "--input-len", "16", "--output-len", args.output_len,
                 "--ttft-lens", *args.ttft_lens, "--out", cold_json]
    result["cold_wall_s"] = _run(bench + cold_args, env, 420)
    result["cold"] = _load(cold_json)
    warm_args = ["--batch-sizes", "1", "--output-len", "8", "--repeats", "1", "--out", warm_json]
    result["warm_wall_s"] = _run(bench + warm_args, env, 240)
    result["warm"] = _load(warm_json)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("cold_wall_s", "warm_wall_s")}, indent=1))


if __name__ == "__main__":
    main()

"""`graphserve bench ...`: the parser wiring of the benchmark subcommands (the benchmarks load lazily)."""
from __future__ import annotations

import argparse
import importlib

# subcommand -> (module under graphserve.benchmarks, one-line help)
BENCHMARKS = {
    "latency": ("latency", "fixed-batch decode speed and time to first token, with roofline fractions"),
    "throughput": ("throughput", "offline throughput on random prompts (an input/output grid; vs transformers)"),
    "serving": ("serving", "a running server under Poisson load: TTFT / TPOT / ITL mean, median, p99"),
    "ops": ("ops", "attention op microbenchmarks: decode GB/s and prefill TFLOP/s vs the ceilings (GPU)"),
}


def add_bench_parser(subparsers) -> None:
    """Add `bench` with one subcommand per benchmark to the `graphserve` parser's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="run a benchmark and write its JSON record",
        description="Benchmarks of graphserve; each prints a JSON record (and writes it with --out).")
    sub = bench.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(f"graphserve.benchmarks.{module_name}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)

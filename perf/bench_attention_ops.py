"""`graphserve bench ops` as a script (attention op microbenchmarks, GPU); see graphserve/benchmarks/ops.py.

The timing functions live in graphserve/benchmarks/attention_kernels.py; perf/gpu_check_attention.py imports them
from here, and reads each row's fraction of the H200's ceilings under its old keys, which these wrappers add.

    python perf/bench_attention_ops.py --out perf/results/h200/attention_ops.json
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphserve.benchmarks import attention_kernels as _kernels  # noqa: E402
from graphserve.benchmarks import ops  # noqa: E402
from graphserve.benchmarks.attention_kernels import (  # noqa: E402,F401
    LLAMA3_8B, attention_args, causal_flops, copy_bandwidth, decode_bytes, make_paged_batch, read_bandwidth,
    time_graph,
)

PEAK_BYTES_PER_S = 4.25e12  # the H200's measured ceilings, which the old keys name
PEAK_FLOP_PER_S = 801e12


def _with_h200_fractions(row: dict) -> dict:
    if "GB_per_s" in row:
        row["frac_of_4.25TBps"] = row["GB_per_s"] * 1e9 / PEAK_BYTES_PER_S
    if "TFLOP_per_s" in row:
        row["frac_of_801TF"] = row["TFLOP_per_s"] * 1e12 / PEAK_FLOP_PER_S
    return row


def bench_decode(*args, **kwargs) -> list[dict]:
    """attention_kernels.bench_decode, each row with its fraction of 4.25 TB/s."""
    return [_with_h200_fractions(r) for r in _kernels.bench_decode(*args, **kwargs)]


def bench_prefill(*args, **kwargs) -> list[dict]:
    """attention_kernels.bench_prefill, each row with its fraction of 801 TFLOP/s."""
    return [_with_h200_fractions(r) for r in _kernels.bench_prefill(*args, **kwargs)]


def bench_reshape_and_cache(*args, **kwargs) -> dict:
    """attention_kernels.bench_reshape_and_cache with its fraction of 4.25 TB/s."""
    return _with_h200_fractions(_kernels.bench_reshape_and_cache(*args, **kwargs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=ops.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(ops.main(ops.add_cli_args(parser).parse_args()))

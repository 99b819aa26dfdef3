"""`graphserve bench ops` as a script (attention op microbenchmarks, GPU); see graphserve/benchmarks/ops.py.

The timing functions live in graphserve/benchmarks/attention_kernels.py; each record carries its fraction of the
device's measured ceilings (graphserve/benchmarks/roofline.py).

    python -m perf.bench_attention_ops --out perf/results/h200/attention_ops.json
"""
import argparse
import sys

from graphserve.benchmarks import ops

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=ops.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(ops.main(ops.add_cli_args(parser).parse_args()))

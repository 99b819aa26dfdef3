"""`graphserve bench latency` as a script (fixed-batch decode and TTFT); see graphserve/benchmarks/latency.py.

    python -m perf.bench_latency --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16
"""
import argparse
import logging
import sys

from graphserve.benchmarks import latency

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=latency.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(latency.main(latency.add_cli_args(parser).parse_args()))

"""`graphserve bench latency` as a script (fixed-batch decode and TTFT); see graphserve/benchmarks/latency.py.

    python perf/bench_latency.py --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphserve.benchmarks import latency  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=latency.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(latency.main(latency.add_cli_args(parser).parse_args()))

"""`graphserve bench throughput` as a script (offline throughput); see graphserve/benchmarks/throughput.py.

    python perf/bench_throughput.py --num-prompts 64 --output-len 64 --chat     # the default model, chat prompts
    python perf/bench_throughput.py --model DIR --load-format dummy --grid
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphserve.benchmarks import throughput  # noqa: E402
from graphserve.benchmarks.datasets import chat_prompts, random_token_prompts  # noqa: E402,F401 (perf/ imports them)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=throughput.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(throughput.main(throughput.add_cli_args(parser).parse_args()))

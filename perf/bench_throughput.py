"""`graphserve bench throughput` as a script (offline throughput); see graphserve/benchmarks/throughput.py.

    python -m perf.bench_throughput --num-prompts 64 --output-len 64 --chat     # the default model, chat prompts
    python -m perf.bench_throughput --model DIR --load-format dummy --grid
"""
import argparse
import sys

from graphserve.benchmarks import throughput
from graphserve.benchmarks.datasets import chat_prompts, random_token_prompts  # noqa: F401 (perf/ imports them)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=throughput.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(throughput.main(throughput.add_cli_args(parser).parse_args()))

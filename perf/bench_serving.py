"""`graphserve bench serving` as a script (a server under Poisson load); see graphserve/benchmarks/serving.py.

    python perf/bench_serving.py --launch "" --num-prompts 64 --input-len 128 --output-len 64 --request-rate 4
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphserve.benchmarks import serving  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(serving.main(serving.add_cli_args(parser).parse_args()))

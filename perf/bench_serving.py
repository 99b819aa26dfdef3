"""`graphserve bench serving` as a script (a server under Poisson load); see graphserve/benchmarks/serving.py.

    python -m perf.bench_serving --launch "" --num-prompts 64 --input-len 128 --output-len 64 --request-rate 4
"""
import argparse
import sys

from graphserve.benchmarks import serving

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(serving.main(serving.add_cli_args(parser).parse_args()))

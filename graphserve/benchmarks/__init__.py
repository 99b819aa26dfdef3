"""The benchmark suite behind `graphserve bench latency | throughput | serving | ops`.

Each benchmark module has `add_cli_args(parser)` and `main(args)`; every run prints and can write one JSON record
(`common.write_record`: command, git sha, versions, device, numbers, roofline fractions).
"""

"""Print the quantized-GEMM variant sweep of a `graphserve bench ops --quant-variants` record as short tables: the
heuristic's default points, then the fastest variants per (GEMM, rows).

    python perf/summarize_quant_variants.py perf/results/h200/quant_variants.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    record = json.load(open(path))
    results = record.get("results", record)
    print("default launch: gemm M us GB/s fraction dense_us speedup")
    for row in results.get("quant_gemm", []):
        print(row["gemm"], row["M"], row["us"], row["GB_per_s"], row["bandwidth_fraction"], row["dense_us"],
              row["speedup_vs_dense"])
    by_point = defaultdict(list)
    for row in results.get("quant_variants", []):
        by_point[(row["gemm"], row["M"])].append(row)
    print("fastest variants: gemm M | us GB/s rel_err kernel block_m/n/k/r split warps stages")
    for (gemm, m), rows in by_point.items():
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        for r in ok[:3]:
            print(gemm, m, "|", r["us"], r["GB_per_s"], f"{r['rel_err']:.1e}", r["kernel"],
                  f"{r['block_m']}/{r['block_n']}/{r['block_k']}/{r['block_r']}", r["split_k"], r["num_warps"],
                  r["num_stages"])
        for r in rows:
            if "error" in r:
                print(gemm, m, "| error", r["kernel"], r["block_n"], r["error"][:80])


if __name__ == "__main__":
    main(sys.argv[1])

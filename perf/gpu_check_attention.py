"""H200 check of the Triton attention ops: bf16 correctness at real shapes, then bandwidth / TFLOP/s.

1. Every kernel against the torch reference in fp32 (||out - ref|| / ||ref|| < 1e-2): head_dim 64/128,
   GQA 4:1 and 8:1, block_size 16, contexts up to 8k, decode batches (split-KV on and off), mixed
   prefill/decode batches with graph padding, sliding window, reshape_and_cache with -1 slots, and the decode
   op captured in a CUDA graph under a static max_seq_len, replayed with new metadata.
2. Paged decode bandwidth at batch 64 x 2k context (Llama-3-8B attention shape) over launch variants, a few
   other batch/context points with the default heuristic, prefill TFLOP/s at 1k and 4k, cache-write bandwidth.
Writes $OUT/attention_gpu_check.json (rewritten after every section) and prints a short table last.

    PYTHONPATH=$PWD python3 perf/gpu_check_attention.py [--quick] [--decode-variants "bn,warps,stages,splits;..."]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from perf.bench_attention_ops import (  # noqa: E402
    LLAMA3_8B, attention_args, bench_decode, bench_prefill, bench_reshape_and_cache, copy_bandwidth,
    make_paged_batch, read_bandwidth,
)

SHAPES = [  # (num_heads, num_kv_heads, head_dim)
    (32, 8, 128),  # Llama-3-8B, GQA 4:1
    (64, 8, 128),  # Llama-3-70B attention, GQA 8:1
    (16, 4, 64),  # GQA 4:1, head_dim 64
    (32, 4, 64),  # GQA 8:1, head_dim 64
]
DECODE_SEQ_LENS = [1, 15, 16, 17, 100, 511, 1000, 2047, 2048, 3000, 4097, 5000, 6000, 7000, 8000, 8192]
MIXED = [(1024, 1024), (512, 4096), (1, 8192), (1, 17), (300, 2300), (77, 77), (1, 5000), (2000, 8000)]
RECORD: dict = {"checks": [], "timings": {}}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save() -> None:
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "attention_gpu_check.json"), "w") as f:
        json.dump(RECORD, f, indent=1)


def reference(batch: dict, scale: float, window: int) -> torch.Tensor:
    """The torch reference op, computed and kept in fp32."""
    from graphserve.ops.attention import _paged_attention_ref

    out = torch.empty(batch["query"].shape, dtype=torch.float32, device="cuda")
    _paged_attention_ref(out, *attention_args(batch), scale, window, 0, 0)
    return out


def record_check(name: str, out: torch.Tensor, ref: torch.Tensor, num_valid: int, **info) -> None:
    """Relative error on the real rows; padding rows must be exactly zero and nothing may be NaN."""
    o, r = out[:num_valid].float(), ref[:num_valid]
    rel = float((o - r).norm() / r.norm())
    pads_zero = bool((out[num_valid:] == 0).all())
    ok = rel < 1e-2 and pads_zero and not bool(torch.isnan(out).any())
    RECORD["checks"].append({"name": name, "rel_err": rel, "pads_zero": pads_zero, "ok": ok, **info})
    log(f"{'ok  ' if ok else 'FAIL'} {name} rel_err={rel:.2e} {info}")


def check_attention(shape: tuple, window: int = 0, decode_splits: tuple = (1,)) -> None:
    """Decode batch (the op's default split heuristic + forced splits) and a mixed batch, through the op."""
    from graphserve.ops.triton.paged_attention import paged_decode_attention

    num_heads, num_kv_heads, head_dim = shape
    dims = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    scale = head_dim**-0.5
    info = {"shape": list(shape), "window": window}
    dec = make_paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, num_pad_rows=3, seed=1, **dims)
    ref = reference(dec, scale, window)
    out = torch.full_like(dec["query"], float("nan"))
    torch.ops.graphserve.paged_attention(out, *attention_args(dec), scale, window, 1, 8192)
    record_check("decode_op", out, ref, len(DECODE_SEQ_LENS), **info)
    for splits in decode_splits:
        out = torch.full_like(dec["query"], float("nan"))
        paged_decode_attention(out, *attention_args(dec), scale, window, 8192, num_splits=splits)
        record_check("decode_forced_splits", out, ref, len(DECODE_SEQ_LENS), num_splits=splits, **info)
    mixed = make_paged_batch([q for q, _ in MIXED], [s for _, s in MIXED], num_pad_rows=5, seed=2, **dims)
    ref = reference(mixed, scale, window)
    out = torch.full_like(mixed["query"], float("nan"))
    torch.ops.graphserve.paged_attention(out, *attention_args(mixed), scale, window, 2000, 8192)
    record_check("mixed_op", out, ref, sum(q for q, _ in MIXED), **info)


def check_reshape_and_cache() -> None:
    from graphserve.ops.attention import _reshape_and_cache_ref

    key = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(300 * 16, device="cuda")[:4096]
    slots[::10] = -1
    caches = [torch.randn(300, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    caches += [c.clone() for c in caches]  # the reference starts from the same cache contents
    torch.ops.graphserve.reshape_and_cache(key, value, caches[0], caches[1], slots)
    _reshape_and_cache_ref(key, value, caches[2], caches[3], slots)
    exact = bool(torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]))
    RECORD["checks"].append({"name": "reshape_and_cache", "exact": exact, "ok": exact})
    log(f"{'ok  ' if exact else 'FAIL'} reshape_and_cache bit-exact={exact}")


def check_graph_replay() -> None:
    """Cache write + decode op captured once (bucket 16, static max_seq_len 8192), replayed on new metadata."""
    shape = LLAMA3_8B
    scale = shape["head_dim"] ** -0.5
    static = make_paged_batch([1] * 16, [8192] * 16, table_width=512, seed=3, **shape)
    key = torch.randn(16, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.full((16,), -1, dtype=torch.int64, device="cuda")
    out = torch.empty_like(static["query"])

    def step() -> None:
        torch.ops.graphserve.reshape_and_cache(key, key, static["key_cache"], static["value_cache"], slots)
        torch.ops.graphserve.paged_attention(out, *attention_args(static), scale, 0, 1, 8192)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial, seq_lens in enumerate([[5, 16, 17, 2000, 8192, 1, 300, 4097] * 2, [700] * 12 + [1, 2, 3, 0]]):
        fresh = make_paged_batch([1] * 16, [max(s, 1) for s in seq_lens], table_width=512, seed=10 + trial, **shape)
        fresh["seq_lens"][15] = seq_lens[15]
        qsl = torch.arange(17, dtype=torch.int32, device="cuda")
        if seq_lens[15] == 0:
            qsl[16] = 15  # a padded sequence: no token this step, its row must come back zeroed
        fresh["query_start_loc"] = qsl
        for name in ("query", "block_table", "seq_lens", "query_start_loc"):
            static[name].copy_(fresh[name])
        static["key_cache"][: fresh["key_cache"].shape[0]].copy_(fresh["key_cache"])
        static["value_cache"][: fresh["value_cache"].shape[0]].copy_(fresh["value_cache"])
        slots.copy_(torch.arange(16, device="cuda") * 16 + 15)  # the cache write runs in the graph too
        slots[::2] = -1
        out.fill_(float("nan"))
        graph.replay()
        ref = reference(static, scale, 0)
        record_check("graph_replay_decode", out, ref, int(qsl[-1]), trial=trial)


def guarded(name: str, fn, *args, **kwargs):
    """Run one section; an exception is recorded (and fails the run) instead of ending the whole check."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (one broken section must not cost the rest of the GPU run)
        traceback.print_exc()
        RECORD["checks"].append({"name": f"{name} raised", "error": repr(e), "ok": False})
        return None
    finally:
        save()


def run_checks() -> None:
    from graphserve.ops.triton import paged_attention, reshape_and_cache

    # Only the attention modules: this check must not depend on the other kernel families.
    paged_attention.register("CUDA")
    reshape_and_cache.register("CUDA")
    guarded("reshape_and_cache", check_reshape_and_cache)
    for i, shape in enumerate(SHAPES):
        guarded(f"attention {shape}", check_attention, shape, decode_splits=(1, 8) if i == 0 else (1,))
    guarded("attention window", check_attention, SHAPES[0], window=1000, decode_splits=(4,))
    guarded("graph replay", check_graph_replay)


def parse_variants(text: str) -> list[dict]:
    rows = []
    for item in filter(None, text.split(";")):
        bn, warps, stages, splits = (int(x) for x in item.split(","))
        rows.append({"block_n": bn, "num_warps": warps, "num_stages": stages, "num_splits": splits})
    return rows


DEFAULT_DECODE_VARIANTS = "64,4,2,1;64,4,3,1;64,2,3,1;32,4,3,1;64,4,3,2"
DEFAULT_PREFILL_VARIANTS = ({}, {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
                            {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3},
                            {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3})
HD64_PREFILL_VARIANTS = ({}, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
                         {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3},
                         {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2})
# Batch x context points where the split count is swept, to set the split heuristic.
SPLIT_POINTS = [(1, 2048), (1, 8192), (8, 4096), (16, 2048), (32, 2048), (64, 8192), (256, 1024)]


def sweep_splits(points) -> list[dict]:
    rows = []
    for num_seqs, context in points:
        splits = [n for n in (1, 2, 4, 8, 16, 32, 64) if n * num_seqs * 8 <= 16 * 132 and n * 64 <= context]
        rows += bench_decode(num_seqs, context, [{}] + [{"num_splits": n} for n in splits])
    return rows


def run_timings(decode_variants: list[dict], prefill_variants, quick: bool) -> None:
    t = RECORD["timings"]
    t["copy_bandwidth_GBps"] = (guarded("copy", copy_bandwidth) or 0) / 1e9
    t["read_bandwidth_GBps"] = (guarded("read", read_bandwidth) or 0) / 1e9
    log(f"copy bandwidth {t['copy_bandwidth_GBps']:.0f} GB/s, read bandwidth {t['read_bandwidth_GBps']:.0f} GB/s")
    t["decode_64x2k"] = guarded("decode 64x2k", bench_decode, 64, 2048, [{}] + decode_variants) or []
    if not quick:
        t["decode_split_sweep"] = guarded("split sweep", sweep_splits, SPLIT_POINTS) or []
    t["prefill"] = (guarded("prefill 1k", bench_prefill, 1024, prefill_variants) or []) + (
        guarded("prefill 4k", bench_prefill, 4096, prefill_variants) or [])
    hd64 = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 64}
    t["prefill_hd64"] = guarded("prefill hd64", bench_prefill, 4096, HD64_PREFILL_VARIANTS, hd64) or []
    t["reshape_and_cache_4k_tokens"] = guarded("reshape_and_cache", bench_reshape_and_cache) or {}


def print_table() -> None:
    print("\n== correctness (bf16 vs fp32 reference, rel err < 1e-2) ==")
    for c in RECORD["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<22} {c.get('rel_err', 0):.2e} "
              f"{c.get('shape', '')} w={c.get('window', '')} splits={c.get('num_splits', '')}")
    t = RECORD["timings"]
    copy, read = t.get("copy_bandwidth_GBps", 0), t.get("read_bandwidth_GBps", 0)
    print(f"\n== decode 64 x 2k, Llama-3-8B attention (this run: copy {copy:.0f} GB/s, read-only {read:.0f} GB/s)")
    for r in sorted(t.get("decode_64x2k", []), key=lambda r: r["us"]):
        cfg = f"bn={r.get('block_n', 'dflt')} w={r.get('num_warps', 'dflt')} st={r.get('num_stages', 'dflt')}"
        print(f"  {cfg:<24} splits={r['num_splits']:<3} {r['us']:8.1f} us {r['GB_per_s']:7.0f} GB/s "
              f"{100 * r['frac_of_4.25TBps']:5.1f} %")
    print("== decode split sweep (bn 64, 4 warps; 'dflt' = the heuristic's choice)")
    for r in t.get("decode_split_sweep", []):
        tag = "dflt" if r["heuristic_splits"] else ""
        print(f"  {r['num_seqs']:>4} x {r['context']:<5} splits={r['num_splits']:<3} {tag:<5}{r['us']:8.1f} us "
              f"{r['GB_per_s']:7.0f} GB/s {100 * r['frac_of_4.25TBps']:5.1f} %")
    print("== prefill (causal, one prompt)")
    for r in t.get("prefill", []) + t.get("prefill_hd64", []):
        cfg = {k: v for k, v in r.items() if k in ("block_m", "block_n", "num_warps", "num_stages")}
        print(f"  {r['kernel']:<22} n={r['prompt_len']:<5} d={r['head_dim']:<4} {r['us']:8.1f} us "
              f"{r['TFLOP_per_s']:6.1f} TFLOP/s "
              f"{100 * r['frac_of_801TF']:5.1f} % {cfg}")
    if t.get("reshape_and_cache_4k_tokens"):
        r = t["reshape_and_cache_4k_tokens"]
        print(f"== reshape_and_cache 4096 tokens: {r['us']:.1f} us {r['GB_per_s']:.0f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing points")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--decode-variants", default=DEFAULT_DECODE_VARIANTS)
    args = parser.parse_args()
    import triton

    RECORD["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                     "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                     "command": " ".join(["python3"] + sys.argv)}
    import graphserve.ops  # noqa: F401  (defines the ops the kernels attach to)

    try:
        if not args.skip_checks:
            run_checks()
        run_timings(parse_variants(args.decode_variants), DEFAULT_PREFILL_VARIANTS, args.quick)
    finally:
        save()
        print_table()
    if not all(c["ok"] for c in RECORD["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Quantized GEMMs on the GPU machine: the GPU tests, a sweep of launch variants at Llama-3-8B's shapes, and the
# AWQ latency suite. Run from the repository root there: `OUT=<dir> bash perf/gpu_quant_sweep.sh [latency]`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}
M="--model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16"
V="gemv:block_n=128,block_r=16,num_warps=4;gemv:block_n=256,block_r=8,num_warps=4"
V="$V;gemv:block_n=256,block_r=16,num_warps=4;gemv:block_n=512,block_r=4,num_warps=2"
V="$V;gemv:block_n=512,block_r=8,num_warps=4;gemv:block_n=1024,block_r=4,num_warps=4"
V="$V;gemv:block_n=128,block_r=32,num_warps=4;gemv:block_n=256,block_r=8,num_warps=2"
V="$V;gemv:block_n=256,block_r=8,num_warps=4,split_k=1"
V="$V;dot:block_m=16,block_n=32,block_k=128,num_warps=4,num_stages=4"
V="$V;dot:block_m=16,block_n=64,block_k=128,num_warps=4,num_stages=4"
V="$V;dot:block_m=16,block_n=128,block_k=64,num_warps=4,num_stages=3"
V="$V;dot:block_m=32,block_n=64,block_k=128,num_warps=4,num_stages=3"
V="$V;dot:block_m=64,block_n=64,block_k=128,num_warps=4,num_stages=3"
V="$V;dot:block_m=64,block_n=128,block_k=64,num_warps=8,num_stages=3"
V=${QUANT_VARIANTS:-$V}

if [ "${1:-}" != "latency" ]; then
  timeout 170 python3 -m pytest -q -m gpu tests/gpu/test_gpu_quant.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  tail -n 3 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 20
  timeout 240 python3 -m graphserve bench ops --skip-attention --quant-batch-sizes 1 2 8 16 64 \
    --quant-variants "$V" --out "$OUT/quant_variants.json" > "$OUT/quant_variants.log" 2>&1
  tail -n 3 "$OUT/quant_variants.log"
  python3 perf/summarize_quant_variants.py "$OUT/quant_variants.json"
  # hardware counters of the batch-1 GEMV at the o_proj and gate_up shapes
  timeout 150 ncu --clock-control none --kernel-name regex:_quant_gemv_kernel --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 -m graphserve bench ops --skip-attention --quant-batch-sizes 1 > "$OUT/quant_gemv_ncu.txt" 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Stall|Issued Ipc|Block Limit|Grid Size|Warp Cycles" "$OUT/quant_gemv_ncu.txt" | head -n 60
fi
[ "${1:-}" = "sweep" ] && exit 0
timeout 240 python3 -m graphserve bench latency $M --quantization awq --batch-sizes 1 64 --input-len 16 \
  --output-len 256 --ttft-lens 1024 --out "$OUT/quant_latency_awq.json" > "$OUT/quant_latency_awq.log" 2>&1
tail -n 25 "$OUT/quant_latency_awq.log"

#!/usr/bin/env bash
# Mixture of experts on the GPU machine. Run from the repository root there: `OUT=<dir> bash perf/gpu_moe_check.sh [part]`.
#   tests:   tests/gpu/test_gpu_moe.py (the fused MoE kernel at Mixtral-8x7B / Qwen3-30B-A3B shapes, CUDA-graph replay)
#            and the MoE architectures of tests/gpu/test_gpu_tiny_models.py (transformers-exact, graphs and eager);
#   ops:     the fused MoE op vs a per-expert loop of bf16 GEMMs at 1, 64 and 2048 tokens, both shapes;
#   latency: Qwen3-30B-A3B shape (random bf16, 61 GB) decode batch 1 / 64; Mixtral-8x7B (94 GB) where it fits.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0 GRAPHSERVE_COMPILE_CACHE_DIR=/tmp/gs_compile
OUT=${OUT:-/tmp/out}
PART=${1:-tests ops latency}
L="--load-format dummy --dtype bfloat16 --batch-sizes 1 64 --input-len 16 --output-len 128 --ttft-lens 2048"
case " $PART " in *" tests "*)
  timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_gpu_moe.py tests/gpu/test_gpu_tiny_models.py -k "moe or mixtral" \
    -p no:cacheprovider > "$OUT/moe_gpu_tests.log" 2>&1
  tail -n 2 "$OUT/moe_gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/moe_gpu_tests.log" | head -n 20;;
esac
case " $PART " in *" ops "*)
  timeout 150 python3 -m graphserve bench ops --skip-attention --quant-batch-sizes --moe-tokens 1 64 2048 \
    --out "$OUT/moe_ops.json" > "$OUT/moe_ops.log" 2>&1 || tail -n 5 "$OUT/moe_ops.log"
  grep -o '"shape": "[^}]*' "$OUT/moe_ops.json" | head -n 6;;
esac
case " $PART " in *" latency "*)
  for model in qwen3-30b-a3b mixtral-8x7b; do
    timeout 240 python3 -m graphserve bench latency --model perf/configs/$model $L --out "$OUT/moe_latency_$model.json" \
      > "$OUT/moe_latency_$model.log" 2>&1
    grep -E "decode_tokens_per_s|\"ttft_ms\"|Error" "$OUT/moe_latency_$model.log" | tail -n 4
  done;;
esac

#!/usr/bin/env bash
# GGUF blocks kept on the GPU. Run from the repository root there, with the gguf wheel carried in wheels/:
# `OUT=<dir> bash perf/gpu_gguf_check.sh [part]`.
#   tests:   tests/gpu/test_gpu_gguf.py (kernels of every type at Llama-3-8B shapes; tiny mixed-recipe Llama with
#            compile and decode graphs);
#   ops:     the GGUF GEMM op in Q4_K / Q6_K / Q8_0 at Llama-3-8B shapes, M = 1 / 16 / 64, vs the dense bf16 GEMM
#            (and the 4-bit AWQ-layout GEMM in the same run);
#   latency: a Llama-3-8B-shaped GGUF of random blocks (perf/make_gguf.py, Q4_K_M then Q8_0) kept quantized:
#            decode batch 1 and 64, TTFT of a 1 k prompt; the bf16 dummy model in the same lease.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0 GRAPHSERVE_COMPILE_CACHE_DIR=/tmp/gs_compile
OUT=${OUT:-/tmp/out}
PART=${1:-tests ops latency}
python3 -c "import gguf" 2>/dev/null || pip install --no-deps -q wheels/gguf-*.whl
TOK=$(python3 -c "from graphserve.benchmarks.tokenizer import benchmark_tokenizer_dir as d; print(d())")
L="--dtype bfloat16 --batch-sizes 1 64 --input-len 16 --output-len 128 --ttft-lens 1024"
case " $PART " in *" tests "*)
  timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_gpu_gguf.py -p no:cacheprovider > "$OUT/gguf_gpu_tests.log" 2>&1
  tail -n 2 "$OUT/gguf_gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gguf_gpu_tests.log" | head -n 20;;
esac
case " $PART " in *" ops "*)
  timeout 150 python3 -m graphserve bench ops --skip-attention --quant-batch-sizes 1 16 64 --gguf-types Q4_K Q6_K Q8_0 \
    --out "$OUT/gguf_ops_llama8b.json" > "$OUT/gguf_ops_llama8b.log" 2>&1 || tail -n 5 "$OUT/gguf_ops_llama8b.log";;
esac
case " $PART " in *" latency "*)
  for recipe in Q4_K_M Q8_0; do
    python3 -m perf.make_gguf --config perf/configs/llama-3-8b --recipe $recipe --out /tmp/llama8b-$recipe.gguf
    timeout 200 python3 -m graphserve bench latency --model /tmp/llama8b-$recipe.gguf --tokenizer "$TOK" $L \
      --out "$OUT/gguf_latency_$recipe.json" > "$OUT/gguf_latency_$recipe.log" 2>&1
    grep -E "decode_tokens_per_s|\"ttft_ms\"|Error|model weights" "$OUT/gguf_latency_$recipe.log" | tail -n 6
    rm -f /tmp/llama8b-$recipe.gguf
  done
  timeout 200 python3 -m graphserve bench latency --model perf/configs/llama-3-8b --load-format dummy $L \
    --out "$OUT/gguf_latency_bf16.json" > "$OUT/gguf_latency_bf16.log" 2>&1
  grep -E "decode_tokens_per_s|\"ttft_ms\"|Error" "$OUT/gguf_latency_bf16.log" | tail -n 4;;
esac

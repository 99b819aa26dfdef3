#!/usr/bin/env bash
# FP8 on the GPU machine, Llama-3-8B shape with dummy weights, bf16 baseline in the same lease.
# Run from the repository root there: `OUT=<dir> bash perf/gpu_fp8_check.sh [part]`.
#   latency:    decode batch 1 / 64 and TTFT of a 1 k prompt: bf16, --quantization fp8 (W8A8 quantized at load),
#               and --kv-cache-dtype fp8;
#   throughput: offline 256/256 (1 000 prompts) bf16 vs W8A8; 1000/1000 (200 prompts) bf16 KV vs FP8 KV.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0 GRAPHSERVE_COMPILE_CACHE_DIR=/tmp/gs_compile
OUT=${OUT:-/tmp/out}
PART=${1:-latency throughput}
M="--model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16"
L="--batch-sizes 1 64 --input-len 16 --output-len 128 --ttft-lens 1024"
case " $PART " in *" latency "*)
  for v in bf16:"" w8a8:"--quantization fp8" kvfp8:"--kv-cache-dtype fp8"; do
    name=${v%%:*}; flags=${v#*:}
    timeout 240 python3 -m graphserve bench latency $M $flags $L --out "$OUT/fp8_latency_$name.json" \
      > "$OUT/fp8_latency_$name.log" 2>&1
    grep -E "tok/s|TTFT|Error" "$OUT/fp8_latency_$name.log" | tail -n 4
  done;;
esac
case " $PART " in *" throughput "*)
  for v in bf16:"" w8a8:"--quantization fp8"; do
    name=${v%%:*}; flags=${v#*:}
    timeout 240 python3 -m graphserve bench throughput $M $flags --num-prompts 1000 --input-len 256 \
      --output-len 256 --out "$OUT/fp8_throughput_256_$name.json" > "$OUT/fp8_throughput_256_$name.log" 2>&1
    grep -E "tok/s|Error" "$OUT/fp8_throughput_256_$name.log" | tail -n 2
  done
  for v in bf16kv:"" fp8kv:"--kv-cache-dtype fp8"; do
    name=${v%%:*}; flags=${v#*:}
    timeout 240 python3 -m graphserve bench throughput $M $flags --num-prompts 200 --input-len 1000 \
      --output-len 1000 --out "$OUT/fp8_throughput_1000_$name.json" > "$OUT/fp8_throughput_1000_$name.log" 2>&1
    grep -E "tok/s|blocks|Error" "$OUT/fp8_throughput_1000_$name.log" | tail -n 3
  done;;
esac
